"""Memory and reads of `grit report` as the run grows (default 50 vs 500 shards of 100 rows): with the default
shard sample (`--max-shards 64`) both should stay flat; with `--all-shards` the objects read grow with the
run while memory, summed shard by shard, should not.

The runs are built in this process by the engine's own per-shard worker code, without Ray or the scheduler:
for each stage and shard of a synthetic img2dataset input (`grit_pipeline.assets.synthetic`, replay detector,
real spaCy chunks, select and compose), `engine.shard_work.run_shard` writes the shard's files as a Ray
worker would and the `_done` marker is written after them as the driver writes it; `run.yaml` carries the
plan's fingerprints. The smaller run is the first shards of the larger one (hard links). No `grit/` final
shards are published (the report does not read them).

Each report runs in a fresh subprocess that sees the run directory through `counted://`: the local disk
under another fsspec protocol, so pyarrow reads Parquet through fsspec (it would bypass fsspec for a plain
local path) and every object opened, file listing and metadata lookup in the run directory is counted.
Gallery images are read from the input tars, outside the run directory, and are not counted (there are
`--sample` of them, 12 by default). The process first builds the report of a one-shard run (it imports
torch for select's NMS and loads matplotlib's fonts; that first report peaks near 900 MB here, whatever the
run), then resets its peak RSS (`/proc/self/clear_refs`) and builds the measured one. Per size and mode: the
peak RSS during the measured report and its RSS before it (so the report's own working memory is the
difference), objects opened, shard files among them and how many shards they belong to, listings, metadata
lookups (HEAD-like) and seconds; what the run's summary (`RunFiles.summary`, i.e.
`grit_pipeline.engine.summary`, which the funnel comes from) opens, lists and looks up is counted apart.

    python bench/report_memory.py                                   # 50 vs 500 shards x 100 rows
    python bench/report_memory.py --shards 50 500 --out bench/out/report_memory.json
    python bench/report_memory.py --runs /tmp/report-runs --code ../before   # an older checkout's report,
                                                                    # on runs kept from an earlier call

Note: until `grit_pipeline.engine.summary` reads compacted ledgers, the summary reads each shard's
`stats.json`: O(shards) objects, counted under `summary_*`, not under the report's own reads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness  # noqa: E402 - this checkout on sys.path, offline environment

REPO = harness.REPO

MODES = {"default": {}, "all": {"max_shards": None}}  # ReportOptions keywords; "all" = `--all-shards`

# The measured side, run as `python -c` in a fresh process (so earlier work does not count in its peak).
CHILD = r'''
import json, re, sys, time
import fsspec
from fsspec.implementations.local import LocalFileSystem

COUNTS = {"opened": [], "listings": 0, "lookups": 0}

class CountedDisk(LocalFileSystem):  # any name but LocalFileSystem: pyarrow then reads through fsspec
    protocol = ("counted",)
    root_marker = "/"

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        return LocalFileSystem._strip_protocol(path[len("counted://"):] if path.startswith("counted://") else path)

    def unstrip_protocol(self, name):
        return "counted://" + self._strip_protocol(name)

    def _open(self, path, mode="rb", **kw):
        if "r" in mode:
            COUNTS["opened"].append(path)
        return super()._open(path, mode=mode, **kw)

    _in_ls = False

    def ls(self, path, detail=False, **kw):
        COUNTS["listings"] += 1
        CountedDisk._in_ls = True  # the local ls looks up each entry; an object store's listing carries them
        try:
            return super().ls(path, detail=detail, **kw)
        finally:
            CountedDisk._in_ls = False

    def info(self, path, **kw):
        COUNTS["lookups"] += not CountedDisk._in_ls
        return super().info(path, **kw)

    def pipe_file(self, path, value, **kw):  # an object store needs no folders; the disk does
        self.makedirs(self._parent(path), exist_ok=True)
        return super().pipe_file(path, value, **kw)

fsspec.register_implementation("counted", CountedDisk, clobber=True)

def kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

run, warm, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
import grit_pipeline.report.build as build
from grit_pipeline.report.run_files import RunFiles

SUMMARY = {"opened": 0, "listings": 0, "lookups": 0}  # what the run's summary (engine.summary) costs
real_summary = RunFiles.summary

def counted_summary(self):
    before = (len(COUNTS["opened"]), COUNTS["listings"], COUNTS["lookups"])
    out = real_summary(self)
    SUMMARY.update(opened=len(COUNTS["opened"]) - before[0], listings=COUNTS["listings"] - before[1],
                   lookups=COUNTS["lookups"] - before[2])
    return out

RunFiles.summary = counted_summary
# Warm up on a one-shard run: imports (torch, for select's NMS), matplotlib's fonts, the spaCy-free rest.
build.build_report("counted://" + warm, build.ReportOptions(**options))
COUNTS.update(opened=[], listings=0, lookups=0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM): from here it is this report's
after_imports = kib("VmRSS")
t0 = time.perf_counter()
result = build.build_report("counted://" + run, build.ReportOptions(**options))
seconds = time.perf_counter() - t0
shard_files = [p for p in COUNTS["opened"] if re.search(r"/stages/[^/]+/[^/]+/shard-\d+\.(rejects\.)?parquet$", p)]
print(json.dumps({"peak_rss_mb": kib("VmHWM") / 1024, "rss_before_mb": after_imports / 1024,
                  "seconds": seconds,
                  "objects_opened": len(COUNTS["opened"]), "shard_files_opened": len(shard_files),
                  "shards_read": len({re.search(r"shard-(\d+)", p).group(1) for p in shard_files}),
                  "listings": COUNTS["listings"], "lookups": COUNTS["lookups"],
                  "summary_objects_opened": SUMMARY["opened"], "summary_listings": SUMMARY["listings"],
                  "summary_lookups": SUMMARY["lookups"],
                  "kept_fraction_rows": result.kept_fraction["rows"]}))
'''


def build_run(work: Path, shards: int, rows_per_shard: int) -> Path:
    """A finished run of `shards` shards written by the engine's per-shard code, in this process."""
    import yaml

    from grit_pipeline.assets.synthetic import replay_overrides, write_img2dataset
    from grit_pipeline.config import config_dict, load_config
    from grit_pipeline.engine.plan import build_plan
    from grit_pipeline.engine.runner import stage_spec
    from grit_pipeline.engine.shard_work import run_shard

    src = write_img2dataset(work / "input", shards=shards, rows_per_shard=rows_per_shard)
    cfg = load_config(None, [*replay_overrides(src.detections), "run.progress=false"])
    plan = build_plan(cfg, input_uri=str(src.root), output_uri=str(work / f"run-{shards}"))
    rundir = plan.rundir
    rundir.write_text("run.yaml", yaml.safe_dump({**config_dict(plan.config), "fingerprints": plan.fingerprints},
                                                 sort_keys=False, allow_unicode=True))
    for sp in plan.stages:
        spec = stage_spec(plan, sp)
        stage = spec.make()
        for shard in plan.shards:
            rundir.write_marker(sp.name, sp.fingerprint, shard, run_shard(spec, stage, shard).marker())
    return Path(rundir.root)


def first_shards(run: Path, dest: Path, shards: int) -> Path:
    """A run of the first `shards` shards of `run`: its run.yaml and those shards' files, hard-linked."""
    dest.mkdir(parents=True)
    shutil.copy(run / "run.yaml", dest / "run.yaml")
    for path in sorted(run.joinpath("stages").rglob("shard-*")):
        if int(path.name.split(".")[0].removeprefix("shard-")) < shards:
            target = dest / path.relative_to(run)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
    return dest


def measure(run: Path, warm: Path, mode: str, code: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(run), str(warm), json.dumps(MODES[mode])], cwd=code,
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"report of {run} ({mode}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--shards", type=int, nargs=2, default=[50, 500], metavar=("SMALL", "LARGE"))
    ap.add_argument("--rows-per-shard", type=int, default=100)
    ap.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["default", "all"])
    ap.add_argument("--code", default=str(REPO), help="checkout whose `grit report` is measured (default: this one)")
    ap.add_argument("--runs", help="build the runs in this folder and keep them; reused when built before with the "
                                   "same sizes (default: a temporary folder)")
    args = ap.parse_args()
    small, large = sorted(args.shards)
    figures: dict = {"rows_per_shard": args.rows_per_shard, "shards_small": small, "shards_large": large}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.runs or tmp)
        built = work / "built.json"
        sizes = {"shards": [small, large], "rows_per_shard": args.rows_per_shard}
        runs = {large: work / f"run-{large}", small: work / f"run-{small}"}
        warm = work / "run-warm-up"
        if built.exists() and json.loads(built.read_text()) == sizes:
            print(f"reusing the runs in {work}", flush=True)
        else:
            if work.exists() and args.runs:
                shutil.rmtree(work)
            t0 = time.perf_counter()
            build_run(work, large, args.rows_per_shard)
            first_shards(runs[large], runs[small], small)
            first_shards(runs[large], warm, 1)
            built.write_text(json.dumps(sizes))
            figures["build_seconds"] = round(time.perf_counter() - t0, 1)
            print(f"built {large} shards x {args.rows_per_shard} rows in {figures['build_seconds']} s", flush=True)
        for mode in args.modes:
            for shards in (small, large):
                r = measure(runs[shards], warm, mode, Path(args.code))
                p = f"{mode}_{shards}"
                figures.update({
                    f"{p}_peak_rss_mb": round(r["peak_rss_mb"], 1),
                    f"{p}_report_mb": round(r["peak_rss_mb"] - r["rss_before_mb"], 1),
                    f"{p}_objects_opened": r["objects_opened"] - r["summary_objects_opened"],
                    f"{p}_shard_files_opened": r["shard_files_opened"], f"{p}_shards_read": r["shards_read"],
                    f"{p}_listings": r["listings"] - r["summary_listings"],
                    f"{p}_lookups": r["lookups"] - r["summary_lookups"],
                    f"{p}_summary_objects_opened": r["summary_objects_opened"],
                    f"{p}_summary_listings": r["summary_listings"], f"{p}_summary_lookups": r["summary_lookups"],
                    f"{p}_kept_fraction_rows": r["kept_fraction_rows"],
                    f"{p}_seconds": round(r["seconds"], 1)})
                print(f"{mode:>7} {shards:>5} shards: peak RSS {r['peak_rss_mb']:.0f} MB "
                      f"({r['peak_rss_mb'] - r['rss_before_mb']:.0f} MB over the RSS before it), "
                      f"{figures[f'{p}_objects_opened']} objects opened ({r['shard_files_opened']} shard files of "
                      f"{r['shards_read']} shards), {figures[f'{p}_listings']} listings, "
                      f"{figures[f'{p}_lookups']} lookups; the summary: {r['summary_objects_opened']} objects, "
                      f"{r['summary_listings']} listings, {r['summary_lookups']} lookups; {r['seconds']:.1f} s",
                      flush=True)
            for key in ("peak_rss_mb", "report_mb", "shard_files_opened", "objects_opened"):
                a, b = figures[f"{mode}_{small}_{key}"], figures[f"{mode}_{large}_{key}"]
                figures[f"{mode}_{key}_ratio"] = round(b / a, 2) if a else None
            print(f"{mode:>7} {large}/{small} shards: peak RSS {figures[f'{mode}_peak_rss_mb_ratio']}x, report's own "
                  f"memory {figures[f'{mode}_report_mb_ratio']}x, shard files opened "
                  f"{figures[f'{mode}_shard_files_opened_ratio']}x", flush=True)
    harness.write_figures(figures, args.out)


if __name__ == "__main__":
    main()
