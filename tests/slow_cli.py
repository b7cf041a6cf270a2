"""`grit` exactly as users run it, with `detect` slowed down: for the operations tests, which must stop,
inspect and contend with a run while it is still running.

    python tests/slow_cli.py SECONDS_PER_BATCH run --input ... --output ...

The slowed stage is the real `detect` (same name, version, config, fingerprint and output) that sleeps
before each batch; Ray ships it to the workers by value.
"""

from __future__ import annotations

import sys
import time

from grit_pipeline.engine import plan as plan_module
from stages.detect import DetectStage

DELAY = float(sys.argv[1])


class SlowDetect(DetectStage):
    def process_batch(self, table):
        time.sleep(DELAY)
        return super().process_batch(table)


def main() -> None:
    import ray.cloudpickle

    from grit_pipeline.cli import app

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    registered = plan_module.default_stage_classes
    plan_module.default_stage_classes = lambda: {**registered(), "detect": SlowDetect}
    sys.argv = ["grit", *sys.argv[2:]]
    app()


if __name__ == "__main__":
    main()
