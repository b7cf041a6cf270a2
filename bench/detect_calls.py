"""How many Ray calls does detect cost per source shard? Figures, not a test.

Runs the real engine (local Ray, this machine's CPUs) over one img2dataset shard of 10,000 rows with a
pixel detector at its default execution settings: transformers GroundingDINO, a tiny randomly initialized
one (`stages.detectors.tiny`: no weights can be downloaded here) at a small input size on CPU, so images
are really read, decoded and detected. The scheduler counts every Ray call it submits for the stage
(`RunResult.ray_calls`: the split task, prepare tasks, actor calls, the write task). Two sides:

- after: the defaults (`part_rows` None: 512 rows rounded up to whole forward batches);
- before: `run.resources.detect.part_rows=<batch_size>`, what `part_rows` None meant before (one part,
  hence one prepare task and one actor call, per forward batch). The scheduler submits a stage in parts
  the same way on both sides, so this is the count the earlier engine made.

Ingest and chunks run once; each side then runs detect alone on a copy of that run directory. Both
sides' detect outputs are compared byte for byte (part sizes are an execution knob).

    python bench/detect_calls.py                      # 10,000 rows; target <= 50 calls per shard
    python bench/detect_calls.py --rows 2000 --out bench/out/detect_calls.json
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import harness  # noqa: E402 - this checkout on sys.path, offline environment

TARGET = 50


def detect_run(config_overrides: list[str], inp: Path, run: Path, extra: list[str]) -> dict:
    """Run detect alone over `run` (ingest and chunks committed there) and say what it cost."""
    from grit_pipeline.config import load_config
    from grit_pipeline.engine.plan import build_plan
    from grit_pipeline.engine.runner import execute
    from grit_pipeline.rundir.store import RunDir

    plan = build_plan(load_config(None, [*config_overrides, *extra]), input_uri=str(inp), output_uri=str(run),
                      from_stage="detect", to_stage="detect")
    stage = plan.stage("detect")
    t0 = time.perf_counter()
    result = execute(plan, progress=False)
    wall = time.perf_counter() - t0
    assert result.ok, result.failures
    outcome = result.stage("detect")
    assert outcome.computed == [0], outcome
    marker = RunDir(str(run)).markers("detect", stage.fingerprint, [0])[0]
    part_rows = stage.resources.part_rows or stage.resources.batch_size  # at most; a small shard: smaller
    calls = result.ray_calls.get("detect", 0)
    output = (run / "stages" / "detect" / stage.fingerprint / "shard-00000.parquet").read_bytes()
    return {"rows_in": marker["rows_in"], "rows_out": marker["rows"], "part_rows": part_rows,
            "parts": (calls - 2) // 2, "ray_calls": calls,  # split, a prepare and an actor call per part, write
            "wall_s": round(wall, 2), "output": output}


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--rows", type=int, default=10_000, help="rows of the one source shard")
    ap.add_argument("--input-size", type=int, default=32, help="detector input size (shorter side)")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count())
    ap.add_argument("--workdir")
    args = ap.parse_args()

    import ray

    from grit_pipeline.assets.synthetic import write_img2dataset
    from grit_pipeline.config import load_config
    from grit_pipeline.engine.plan import build_plan
    from grit_pipeline.engine.runner import execute
    from stages.detectors import tiny
    from stages.detectors.config import DetectExecution

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        inp = write_img2dataset(work / "input", shards=1, rows_per_shard=args.rows, bad_rows=False)
        model = tiny.hf_grounding_dino(work / "gd")
        config = ["detect.backend=hf", f"detect.hf_model={model}", f"detect.input_size={args.input_size}",
                  f"detect.max_size={args.input_size * 2}", "run.resources.detect.device=cpu", "run.progress=false"]
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        try:
            upstream = work / "upstream"
            first = execute(build_plan(load_config(None, config), input_uri=str(inp.root), output_uri=str(upstream),
                                       to_stage="chunks"), progress=False)
            assert first.ok, first.failures
            batch = DetectExecution().batch_size
            sides = {}
            for side, extra in (("before", [f"run.resources.detect.part_rows={batch}"]), ("after", [])):
                run = work / side
                shutil.copytree(upstream, run)
                sides[side] = detect_run(config, inp.root, run, extra)
        finally:
            ray.shutdown()

    before, after = sides["before"], sides["after"]
    same = before.pop("output") == after.pop("output")
    # what a 10k-row shard costs: measured when the shard has 10k rows, else by the count's make-up
    per_10k = {s: v["ray_calls"] if v["rows_in"] == 10_000 else 2 + 2 * -(-10_000 // v["part_rows"])
               for s, v in sides.items()}  # (10k rows are far more than MIN_PARTS parts of part_rows)
    figures = {
        "rows_in": after["rows_in"], "batch_size": batch, "input_size": args.input_size, "cpus": args.num_cpus,
        "before_part_rows": before["part_rows"], "before_parts": before["parts"],
        "before_ray_calls": before["ray_calls"], "before_wall_s": before["wall_s"],
        "after_part_rows": after["part_rows"], "after_parts": after["parts"],
        "after_ray_calls": after["ray_calls"], "after_wall_s": after["wall_s"],
        "before_calls_per_10k_row_shard": per_10k["before"], "after_calls_per_10k_row_shard": per_10k["after"],
        "calls_ratio": round(after["ray_calls"] / before["ray_calls"], 4),
        "outputs_identical": same,
    }
    print(f"detect over one shard of {after['rows_in']:,} rows (tiny GroundingDINO, {args.input_size} px, CPU, "
          f"batch_size {batch}), Ray calls the scheduler submitted for the stage:")
    for side in ("before", "after"):
        v = sides[side]
        print(f"  {side:<6} part_rows {v['part_rows']:>4}: {v['parts']:>5} parts -> {v['ray_calls']:>5} calls "
              f"(split + {v['parts']} prepare + {v['parts']} actor + write); detect run {v['wall_s']} s")
    how = "measured" if after["rows_in"] == 10_000 else f"from parts of that size, not measured ({after['rows_in']} rows)"
    print(f"after / before = {figures['calls_ratio']}; a 10k-row shard: {per_10k['before']} -> {per_10k['after']} "
          f"calls ({how}), target <= {TARGET}: {'met' if per_10k['after'] <= TARGET else 'NOT met'}; "
          f"detect outputs identical: {same}")
    harness.write_figures(figures, args.out)


if __name__ == "__main__":
    main()
