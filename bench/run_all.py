"""Run every benchmark script in bench/ and write bench/RESULTS.md.

Each script prints its figures and, given `--out FILE`, writes them as a flat JSON object (the scaffolding
they share -- sys.path, environment, `--out`, the JSON -- is `bench/harness.py`, not a benchmark). This
runner calls them one after another (never in parallel: they measure the machine), then records each
figure with the command that reproduces it, the machine (cores, memory, GPU) and the date.

    python bench/run_all.py                 # all scripts
    python bench/run_all.py --only regenerate chunk_quality
    python bench/run_all.py --collect engine_overhead   # record bench/out/engine_overhead.json as it is

`--collect` is for figures you produced by running a script yourself with `--out bench/out/NAME.json`
(on a quiet machine, say): they are recorded with the script's command, without running it again.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"

# Script name -> extra arguments. Order: cheap first, so a partial run still says something.
SCRIPTS: dict[str, list[str]] = {
    "text_throughput": [],
    "chunk_quality": [],
    "select_throughput": [],
    "nms_rule": [],
    "score_rules": [],
    "detect_throughput": [],
    "detect_calls": [],
    "image_reads": [],
    "image_refs": [],
    "engine_overhead": [],
    "pipeline_overlap": [],
    "regenerate": [],
    "peak_rss": [],
    "status_read": [],
    "run_scale": ["--shards", "1000", "10000", "--finished", "100000"],
    "driver_scale": [],
    "report_memory": [],
    "publish_scale": [],
    "validate_scale": [],
    "train_grounding": [],
}

# Figures of an earlier version, kept beside the current ones: bench/out/NAME_before.json, written by
# running today's script against a checkout of that version (`git worktree add ../before REV`, then
# `GRIT_REPO=../before python bench/NAME.py --out bench/out/NAME_before.json`; see bench/harness.py).
BEFORE: dict[str, str] = {
    "pipeline_overlap": "6771668 (the stage-by-stage engine, before the streaming one)",
    "report_memory": "33dd3d3 (before the shard sample: the report concatenated every shard's rows; its default "
                     "and `all` are the same)",
    "publish_scale": "33dd3d3 (one sorted array re-sorted per lookup; run with `--shards 8 --build 0`)",
    "run_scale": "acbd616, `--shards 1000 3000 --finished 100000` (a re-run listed every stage's `_done/`; the "
                 "S3 server answered listings with moto's own scan of the whole bucket per page)",
}


def machine() -> dict[str, str]:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a missing torch just means no GPU figure
        pass
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": str(os.cpu_count()),
        "memory": f"{mem_gib:.0f} GiB",
        "gpu": gpu,
        "python": platform.python_version(),
    }


def run_one(name: str, extra: list[str]) -> dict:
    script = BENCH_DIR / f"{name}.py"
    out = OUT_DIR / f"{name}.json"
    cmd = [sys.executable, str(script.relative_to(REPO)), *extra, "--out", str(out.relative_to(REPO))]
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True)
    seconds = time.perf_counter() - started
    sys.stdout.write(proc.stdout[-4000:])
    figures = json.loads(out.read_text()) if proc.returncode == 0 and out.exists() else {}
    if proc.returncode != 0:
        sys.stdout.write(proc.stderr[-4000:])
    return {
        "name": name,
        "command": "python " + " ".join(cmd[1:-2]),
        "ok": proc.returncode == 0,
        "seconds": round(seconds, 1),
        "figures": figures,
        "error": proc.stderr.strip().splitlines()[-1] if proc.returncode != 0 and proc.stderr.strip() else "",
    }


def collect_one(name: str, extra: list[str]) -> dict:
    out = OUT_DIR / f"{name}.json"
    if not out.exists():
        raise SystemExit(f"--collect {name}: {out.relative_to(REPO)} does not exist; run the script with --out first")
    return {
        "name": name,
        "command": " ".join(["python", f"bench/{name}.py", *extra]),
        "ok": True,
        "seconds": None,
        "figures": json.loads(out.read_text()),
        "error": "",
    }


def write_results(results: list[dict], info: dict[str, str]) -> Path:
    lines = [
        "# Benchmark results",
        "",
        f"Written by `make bench` (`python bench/run_all.py`) on {dt.date.today().isoformat()}.",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        "",
    ]
    for r in results:
        took = f" ({r['seconds']} s)" if r["seconds"] is not None else ""
        lines += [f"## {r['name']}", "", f"Command: `{r['command']}`{took}", ""]
        if not r["ok"]:
            lines += [f"FAILED: {r['error']}", ""]
            continue
        lines += ["| figure | value |", "|---|---|"]
        for k, v in r["figures"].items():
            lines.append(f"| {k} | {v} |")
        lines.append("")
        before = OUT_DIR / f"{r['name']}_before.json"
        if r["name"] in BEFORE and before.exists():
            lines += [f"Before, at commit {BEFORE[r['name']]}:", "", "| figure | value |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in json.loads(before.read_text()).items()]
            lines.append("")
    path = BENCH_DIR / "RESULTS.md"
    path.write_text("\n".join(lines))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="run only these scripts (names without .py)")
    parser.add_argument("--collect", nargs="*", default=[],
                        help="record these scripts' figures from bench/out/NAME.json without running them")
    args = parser.parse_args()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    names = [n for n in SCRIPTS if (BENCH_DIR / f"{n}.py").exists()]
    unknown = {n for n in (set(args.only or []) | set(args.collect)) if n not in names}
    if unknown:
        parser.error(f"no such benchmark: {', '.join(sorted(unknown))}")
    if args.only is not None or args.collect:
        names = [n for n in names if n in (args.only or [])]
    store = BENCH_DIR / "results.json"  # every script's latest figures, so --only updates in place
    previous = {r["name"]: r for r in json.loads(store.read_text())} if store.exists() else {}
    fresh = {n: run_one(n, SCRIPTS[n]) for n in names}
    collected = {n: collect_one(n, SCRIPTS[n]) for n in args.collect}
    merged = {**previous, **collected, **fresh}
    results = [merged[n] for n in SCRIPTS if n in merged]
    store.write_text(json.dumps(results, indent=1) + "\n")
    path = write_results(results, machine())
    print(f"wrote {path}")
    return 0 if all(r["ok"] for r in fresh.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
