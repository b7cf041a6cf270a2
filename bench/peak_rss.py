"""Peak memory of a whole run for 20k vs 200k rows: the engine streams shards, so it should stay flat.

Each size runs `grit run` (replay detector, local Ray) in a fresh subprocess; every 0.5 s this script
reads /proc for the driver and all of its descendants (Ray's GCS, raylet and workers start under it).
Reported per size: the driver's peak RSS and the peak of the process tree's summed PSS (proportional set
size, so pages shared between Ray processes, such as the object store, are not counted twice).

    python bench/peak_rss.py --out bench/out/peak_rss.json
    python bench/peak_rss.py --rows 20000 100000        # other sizes
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import harness  # first: this checkout on sys.path, the offline environment

ROWS_PER_SHARD = 10_000  # img2dataset's usual shard size


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


def _kib(pid: int, path: str, field: str) -> int:
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.driver_rss_kib = self.tree_pss_kib = self.processes = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            pids = _descendants(self.pid)
            self.driver_rss_kib = max(self.driver_rss_kib, _kib(self.pid, "status", "VmRSS"))
            self.tree_pss_kib = max(self.tree_pss_kib, sum(_kib(p, "smaps_rollup", "Pss") for p in pids))
            self.processes = max(self.processes, len(pids))
            self.stop.wait(self.every)


def measure(rows: int, work: Path, num_cpus: int) -> dict:
    from grit_pipeline.assets.synthetic import replay_overrides, write_img2dataset

    shards = max(1, rows // ROWS_PER_SHARD)
    inp = write_img2dataset(work / f"input-{rows}", shards=shards, rows_per_shard=rows // shards)
    cmd = [sys.executable, "-m", "grit_pipeline.cli", "run", "--input", str(inp.root),
           "--output", str(work / f"run-{rows}"), "--num-cpus", str(num_cpus), "--no-progress",
           *replay_overrides(inp.detections)]
    env = {**os.environ, **harness.OFFLINE_ENV}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=harness.REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid)
    sampler.start()
    _, err = proc.communicate()
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"grit run failed for {rows} rows:\n{err[-3000:]}")
    return {"rows": inp.rows, "shards": shards, "seconds": round(time.perf_counter() - t0, 1),
            "driver_peak_rss_mb": round(sampler.driver_rss_kib / 1024, 1),
            "tree_peak_pss_mb": round(sampler.tree_pss_kib / 1024, 1),
            "max_processes": sampler.processes}


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000])
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count())
    ap.add_argument("--workdir")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for rows in args.rows:
            r = measure(rows, Path(tmp), args.num_cpus)
            results.append(r)
            print(f"{r['rows']:>8,} rows ({r['shards']} shards, {r['seconds']} s): driver peak RSS "
                  f"{r['driver_peak_rss_mb']:.0f} MB, all Ray processes peak PSS {r['tree_peak_pss_mb']:.0f} MB",
                  flush=True)
    figures = {"cpus": args.num_cpus, "runs": results}
    if len(results) >= 2:
        figures["tree_pss_ratio_last_over_first"] = round(results[-1]["tree_peak_pss_mb"] / results[0]["tree_peak_pss_mb"], 2)
        figures["driver_rss_ratio_last_over_first"] = round(
            results[-1]["driver_peak_rss_mb"] / results[0]["driver_peak_rss_mb"], 2)
        print(f"ratio {results[-1]['rows']:,} / {results[0]['rows']:,} rows: driver "
              f"{figures['driver_rss_ratio_last_over_first']}x, all processes {figures['tree_pss_ratio_last_over_first']}x")
    harness.write_figures(figures, args.out)


if __name__ == "__main__":
    main()
