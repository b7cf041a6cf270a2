"""A pipeline driver for the driver-kill test, run as its own process so the test can SIGKILL it.

    python tests/reliability/driver.py '<json: input, output, config, control, after_commits, delay>'

It joins the test session's Ray (`config.run.address`), and runs the pipeline with a killable `detect`
(`faults.killable`) that stops at its kill point once `after_commits` detect shards are committed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import faults  # noqa: E402

from grit_pipeline.api import resolve_config  # noqa: E402
from grit_pipeline.engine.plan import build_plan, default_stage_classes  # noqa: E402
from grit_pipeline.engine.runner import execute  # noqa: E402


def main(spec: dict) -> None:
    faults.ship_by_value()
    config = resolve_config(spec["config"])
    plan = build_plan(config, input_uri=spec["input"], output_uri=spec["output"])
    fp = plan.fingerprints["detect"]
    classes = default_stage_classes()
    classes["detect"] = faults.killable(
        classes["detect"], spec["control"], after_commits=spec["after_commits"], delay=spec["delay"],
        done_dir=str(Path(spec["output"]) / "stages" / "detect" / fp / "_done"))
    plan = build_plan(config, input_uri=spec["input"], output_uri=spec["output"], stage_classes=classes)
    execute(plan)
    print("driver finished without being killed", flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
