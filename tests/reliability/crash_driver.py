"""A pipeline driver that dies in the middle of its own bookkeeping, for the crash tests.

    GRIT_TEST_CRASH='<text>:<n>' python tests/reliability/crash_driver.py '<json: input, output, config, segment_records>'

It joins the test session's Ray (`config.run.address`; its workers register the test filesystems) and runs the real pipeline into `crashy://<output>`
(`tests/testfs.py`), which SIGKILLs this process at the n-th write of a path containing the text. Ledger
segments of `segment_records` records make a segment seal and a summary fold happen mid-run; the ledgers
are flushed with every batch of commits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: testfs

import testfs  # noqa: E402

from grit_pipeline.api import resolve_config  # noqa: E402
from grit_pipeline.engine import bookkeeping  # noqa: E402
from grit_pipeline.engine.plan import build_plan  # noqa: E402
from grit_pipeline.engine.runner import execute  # noqa: E402
from grit_pipeline.rundir import ledger  # noqa: E402


def main(spec: dict) -> None:
    import os

    import ray

    testfs.register()
    tests = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(address=spec["config"]["run"]["address"], log_to_driver=False,  # workers know crashy:// too
             runtime_env={"worker_process_setup_hook": "testfs.register", "env_vars": {"PYTHONPATH": path}})
    ledger.SEGMENT_RECORDS = int(spec["segment_records"])
    # ledgers and progress.json flushed with every batch of commits, not every 5 s: the n-th write of one
    # comes early in the run whatever the machine's pace, so the crash is always mid-run
    bookkeeping.FLUSH_S = 0.0
    plan = build_plan(resolve_config(spec["config"]), input_uri=spec["input"], output_uri=f"crashy://{spec['output']}")
    execute(plan, progress=False)
    print("driver finished without crashing", flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
