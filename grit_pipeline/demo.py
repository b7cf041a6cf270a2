"""`make demo` = `python -m grit_pipeline.demo [RUN_DIR]`: the whole pipeline on the bundled sample, offline.

Runs ingest -> chunks -> detect -> select -> compose on local Ray with `configs/demo.yaml` over the sample
in `grit_pipeline/assets/demo/` (scikit-image photos in img2dataset layout, two shards, with a failed
download, an empty caption, an abstract-only caption and a caption whose boxes are all weak among them),
then builds the HTML report (`grit report`), validates the GrIT shards (`grit validate`) and prints where
everything is and one grounded caption.

Honest about what is real: the boxes come from `assets/demo/detections.parquet` (the `replay` detector),
hand-placed on the photos, because no detector weights ship offline. Chunking, referring expressions,
thresholding, NMS, containment, location tokens, the run directory and the report are the real code.

A second run reuses every committed stage output (the engine's fingerprint cache) and finishes in seconds;
`--fresh` deletes the run directory first. Extra `stage.key=value` arguments are config overrides, e.g.
`python -m grit_pipeline.demo demo-run select.min_score=0.85` re-runs only select and compose.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

PACKAGE_DIR = Path(__file__).resolve().parent
DEMO_ASSETS = PACKAGE_DIR / "assets" / "demo"
DEMO_SHARDS = DEMO_ASSETS / "shards"
DEMO_DETECTIONS = DEMO_ASSETS / "detections.parquet"
DEMO_CONFIG = PACKAGE_DIR.parent / "configs" / "demo.yaml"
DEFAULT_RUN_DIR = "demo-run"

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    run_dir: Path
    grit_dir: Path
    report_index: Path | None
    rows: int
    problems: list[str]
    sample: dict[str, Any] | None
    seconds: float
    summary: dict[str, Any]

    @property
    def ok(self) -> bool:
        return not self.problems and self.rows > 0


def demo_overrides() -> list[str]:
    """The demo config's repository-relative paths, made absolute so the demo runs from any directory."""
    return [f"run.input={DEMO_SHARDS}", f"detect.replay_path={DEMO_DETECTIONS}"]


def run_demo(run_dir: str | Path = DEFAULT_RUN_DIR, overrides: Sequence[str] = (), *, fresh: bool = False,
             report: bool = True, progress: bool = True) -> DemoResult:
    """Run the demo pipeline into `run_dir`, build the report, validate the shards."""
    from grit_pipeline.api import run_pipeline
    from grit_pipeline.commands.validate import validate_run

    if not DEMO_CONFIG.exists():
        raise FileNotFoundError(f"{DEMO_CONFIG}: the demo config is missing; run the demo from a clone of the "
                                "repository (`make demo`)")
    run_dir = Path(run_dir).resolve()
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    started = time.perf_counter()
    result = run_pipeline(DEMO_CONFIG, output=str(run_dir), overrides=[*demo_overrides(), *overrides],
                          progress=progress)
    if not result.ok:
        raise RuntimeError("demo run failed:\n" + "\n".join(str(f) for f in result.failures))

    report_index = None
    if report and importlib.util.find_spec("grit_pipeline.report") is not None:
        from grit_pipeline.report import build_report

        built = build_report(str(run_dir))
        report_index = Path(built.index_url.removeprefix("file://"))

    validation = validate_run(str(run_dir))
    grit_dir = run_dir / "grit"
    return DemoResult(
        run_dir=run_dir, grit_dir=grit_dir, report_index=report_index, rows=validation.rows,
        problems=[str(p) for p in validation.problems] + ([] if validation.files else ["no final shards"]),
        sample=pick_sample(grit_dir), seconds=time.perf_counter() - started, summary=result.summary)


def pick_sample(grit_dir: Path) -> dict[str, Any] | None:
    """The final row with the most tagged phrases (first in key order among equals): the one to show."""
    best = None
    for path in sorted(grit_dir.glob("shard-*.parquet")):
        for row in pq.read_table(path, columns=["key", "caption", "grounded_caption", "markdown_caption"]).to_pylist():
            n = row["grounded_caption"].count("<phrase>")
            if best is None or n > best[0]:
                best = (n, row)
    return best[1] if best else None


def print_result(res: DemoResult) -> None:
    from rich.console import Console
    from rich.markup import escape

    from grit_pipeline.commands.stats import funnel_table

    console = Console()
    console.print(funnel_table(res.summary))
    for stage, s in res.summary.get("stages", {}).items():
        if s.get("rejects"):
            console.print(f"  rejected in {stage}: " + ", ".join(f"{k} {v}" for k, v in s["rejects"].items()))
    console.print()
    console.print(f"GrIT shards:  {res.grit_dir}")
    if res.report_index is not None:
        console.print(f"report:       {res.report_index}")
    console.print(f"validation:   {res.rows} rows, " + ("[green]OK[/green]" if res.ok else
                                                         f"[red]{len(res.problems)} problem(s)[/red]"))
    for p in res.problems[:20]:
        console.print(f"  {escape(p)}")
    if res.sample is not None:
        console.print()
        console.print(f"sample row {res.sample['key']}: {escape(res.sample['caption'])}", soft_wrap=True)
        console.print(f"  grounded: {escape(res.sample['grounded_caption'])}", soft_wrap=True)
        console.print(f"  markdown: {escape(res.sample['markdown_caption'])}", soft_wrap=True)
    console.print()
    console.print("The boxes in this demo are replayed from hand annotations "
                  f"({DEMO_DETECTIONS.relative_to(PACKAGE_DIR.parent)}): no detector weights ship offline.")
    console.print(f"done in {res.seconds:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grit_pipeline.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", default=DEFAULT_RUN_DIR, help="run directory (default: demo-run)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. select.min_score=0.85")
    parser.add_argument("--fresh", action="store_true", help="delete the run directory first")
    parser.add_argument("--no-report", action="store_true", help="skip the HTML report")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.run_dir and "=" in args.run_dir:  # only overrides given
        args.overrides.insert(0, args.run_dir)
        args.run_dir = DEFAULT_RUN_DIR
    from grit_pipeline.logs import basic_config  # escapes control characters in log lines
    basic_config(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    res = run_demo(args.run_dir, args.overrides, fresh=args.fresh, report=not args.no_report,
                   progress=not args.no_progress)
    print_result(res)
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
