"""Regenerating with a new threshold: a full run vs a re-run with another `select.min_score`.

The re-run reuses the committed ingest, chunks and detect outputs (their fingerprints do not change) and
recomputes only select and compose. Synthetic img2dataset input (default 20,000 rows), replay detector,
local Ray started once before both runs (its start-up is reported apart).

    python bench/regenerate.py --out bench/out/regenerate.json
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import harness  # first: this checkout on sys.path, the offline environment

from grit_pipeline.assets.synthetic import replay_overrides, write_img2dataset


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--min-score", type=float, default=0.8, help="threshold of the re-run (first run: 0.65)")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count())
    ap.add_argument("--workdir")
    args = ap.parse_args()

    import ray

    from grit_pipeline.api import run_pipeline

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        inp = write_img2dataset(work / "input", shards=args.shards, rows_per_shard=args.rows // args.shards)
        overrides = [*replay_overrides(inp.detections), "run.progress=false"]
        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        full = run_pipeline(None, input=str(inp.root), output=str(work / "run"), overrides=overrides)
        full_s = time.perf_counter() - t0
        print(f"full run: {full_s:.1f} s", flush=True)
        t0 = time.perf_counter()
        rerun = run_pipeline(None, input=str(inp.root), output=str(work / "run"),
                             overrides=[*overrides, f"select.min_score={args.min_score}"])
        rerun_s = time.perf_counter() - t0
        ray.shutdown()
    assert full.ok and rerun.ok
    recomputed = [s.name for s in rerun.stages if s.computed]
    assert recomputed == ["select", "compose"], recomputed
    figures = {
        "rows": inp.rows,
        "cpus": args.num_cpus,
        "ray_init_s": round(init_s, 2),
        "full_run_s": round(full_s, 2),
        "rerun_new_min_score_s": round(rerun_s, 2),
        "speedup": round(full_s / rerun_s, 1),
        "final_rows_full": full.summary["stages"]["compose"]["rows_out"],
        "final_rows_rerun": rerun.summary["stages"]["compose"]["rows_out"],
        "rerun_recomputed": recomputed,
    }
    print(f"re-run with select.min_score={args.min_score}: {rerun_s:.1f} s "
          f"(recomputed {', '.join(recomputed)}; {figures['speedup']}x faster; ray.init {init_s:.1f} s apart)")
    print(f"final rows: {figures['final_rows_full']:,} -> {figures['final_rows_rerun']:,}")
    harness.write_figures(figures, args.out)


if __name__ == "__main__":
    main()
