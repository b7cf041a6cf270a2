"""What running on Ray costs: the pipeline's stages over the same rows in one process vs through the engine.

Both sides run ingest -> chunks (spaCy) -> detect (replay backend, so no GPU is involved) -> select ->
compose over a synthetic img2dataset input (default 20,000 rows in 4 shards). In-process: each stage called
on whole shards, one after another, in this process (models loaded once). Engine: `grit_pipeline.api.
run_pipeline` on local Ray, writing the run directory (commits, stats, final shards) -- reported with and
without Ray's own start-up.

    python bench/engine_overhead.py                   # 20k rows
    python bench/engine_overhead.py --rows 5000 --out bench/out/engine_overhead.json
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import harness  # first: this checkout on sys.path, the offline environment

from grit_pipeline.assets.synthetic import replay_overrides, write_img2dataset


def in_process(root: Path, overrides: list[str]) -> tuple[float, int]:
    """Seconds to run all stages in this process over every shard; rows in the final tables."""
    from grit_pipeline.config import load_config
    from grit_pipeline.engine.stage_io import join_upstream
    from stages.registry import STAGE_ORDER, stage_class

    t0 = time.perf_counter()
    cfg = load_config(None, overrides)
    stages = [stage_class(n)(getattr(cfg, n)) for n in STAGE_ORDER]
    for s in stages:
        s.setup()
    rows = 0
    for src in stages[0].discover(str(root)):
        tables = [stages[0].process_batch(stages[0].read(src)).output]
        for i, stage in enumerate(stages[1:], start=1):
            inp = stage.prepare_batch(join_upstream(list(STAGE_ORDER[:i]), tables)).output
            tables.append(stage.process_batch(inp).output)
        rows += tables[-1].num_rows
    return time.perf_counter() - t0, rows


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count())
    ap.add_argument("--workdir", help="where to write the input and run (default: a temporary folder)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        inp = write_img2dataset(work / "input", shards=args.shards, rows_per_shard=args.rows // args.shards)
        overrides = replay_overrides(inp.detections)
        local_s, local_rows = in_process(inp.root, overrides)
        print(f"in-process: {local_s:.1f} s for {inp.rows:,} rows ({local_rows:,} final)", flush=True)

        import ray

        from grit_pipeline.api import run_pipeline

        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = run_pipeline(None, input=str(inp.root), output=str(work / "run"),
                              overrides=[*overrides, "run.progress=false"])
        engine_s = time.perf_counter() - t0
        ray.shutdown()
        assert result.ok, result.failures
        engine_rows = result.summary["stages"]["compose"]["rows_out"]
        assert engine_rows == local_rows, (engine_rows, local_rows)
    figures = {
        "rows": inp.rows,
        "shards": args.shards,
        "cpus": args.num_cpus,
        "in_process_s": round(local_s, 2),
        "engine_s": round(engine_s, 2),
        "ray_init_s": round(init_s, 2),
        "engine_over_in_process": round(engine_s / local_s, 3),
        "engine_with_init_over_in_process": round((engine_s + init_s) / local_s, 3),
    }
    print(f"engine on local Ray ({args.num_cpus} CPUs): {engine_s:.1f} s (+ {init_s:.1f} s ray.init)")
    print(f"ratio engine / in-process: {figures['engine_over_in_process']:.2f} "
          f"({figures['engine_with_init_over_in_process']:.2f} with Ray start-up)")
    harness.write_figures(figures, args.out)


if __name__ == "__main__":
    main()
