"""The driver's CPU per shard of a whole run as the run grows, on local disk (issue 18): the real engine with
`bench/run_scale.py`'s instant stages (each returns its few rows at once; see that script), so what is
measured is the scheduling loop, the bookkeeping thread and Ray's task submission, with neither stage work
nor an object store in the way. Also prints the most shards the run had in flight at once.

    python bench/driver_scale.py                       # 1,000 and 10,000 shards (about 12 min here)
    python bench/driver_scale.py --shards 500 2000 --out /tmp/driver_scale.json

Each size runs in a fresh child process; figures are that process's CPU time (all its threads) over the
run, divided by the shards.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import harness  # noqa: F401 - before any project import: this checkout on sys.path, offline environment


def measure(shards: int, rows: int) -> dict:
    import ray.cloudpickle
    import run_scale

    from grit_pipeline.engine.plan import build_plan, config_for
    from grit_pipeline.engine.runner import execute
    from grit_pipeline.engine.scheduler import Scheduler

    ray.cloudpickle.register_pickle_by_value(run_scale)  # the instant stages travel to the workers by value
    peak = [0]
    run = Scheduler.run

    def recording_run(self) -> None:
        try:
            run(self)
        finally:
            peak[0] = self.peak_in_flight

    Scheduler.run = recording_run
    with tempfile.TemporaryDirectory() as tmp:
        config = config_for(run_scale.STAGES, run={"progress": False, "num_cpus": 2})
        plan = build_plan(config, input_uri=f"scale://{shards}/{rows}", output_uri=f"{tmp}/run",
                          stage_classes=run_scale.STAGES)
        t0, cpu0 = time.perf_counter(), time.process_time()
        result = execute(plan, progress=False, command="bench/driver_scale.py")
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert result.ok and len(result.final_shards) == shards, result.failures
    return {"seconds": round(wall, 1), "driver_cpu_s": round(cpu, 2),
            "driver_cpu_ms_per_shard": round(cpu / shards * 1000, 2), "peak_in_flight": peak[0]}


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--shards", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--rows", type=int, default=2, help="rows per shard")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child: one size
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.rows)))
        return
    figures: dict = {"rows_per_shard": args.rows}
    for n in args.shards:
        done = subprocess.run([sys.executable, __file__, "--one", str(n), "--rows", str(args.rows)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-5000:])
            raise SystemExit(f"driver_scale: {n} shards failed")
        res = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"S={n:>7,}: run {res['seconds']} s, driver CPU {res['driver_cpu_ms_per_shard']} ms/shard, "
              f"at most {res['peak_in_flight']} shards in flight", flush=True)
        figures |= {f"s{n}_{k}": v for k, v in res.items()}
    if len(args.shards) > 1:
        a, b = args.shards[0], args.shards[-1]
        figures[f"s{b}_over_s{a}_driver_cpu_per_shard"] = round(
            figures[f"s{b}_driver_cpu_ms_per_shard"] / figures[f"s{a}_driver_cpu_ms_per_shard"], 2)
    harness.write_figures(figures, args.out)


if __name__ == "__main__":
    main()
