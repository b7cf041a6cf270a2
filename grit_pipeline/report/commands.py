"""The `grit report` and `grit inspect` commands; `grit_pipeline.cli` adds them with `register(app)`.

The report and inspect modules (pyarrow datasets, matplotlib, the select stage's torch) are imported inside
the commands, so registering them costs `grit --help` nothing.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from grit_pipeline.commands.options import JsonOpt, RunArg
from grit_pipeline.report.shard_sample import DEFAULT_MAX_SHARDS
from stages.registry import StageName


def _fail(console: Console, message: str) -> None:
    console.print(Text(f"error: {message}", style="bold red"))
    raise typer.Exit(code=2)


def report_command(
    run: RunArg,
    sample: Annotated[int, typer.Option("--sample", "-n", min=0, help="Rows shown in the gallery.")] = 12,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the gallery sample (same seed, same rows).")] = 0,
    examples: Annotated[int, typer.Option("--examples", min=0,
                                          help="Reject examples shown per stage and reason.")] = 5,
    max_shards: Annotated[int, typer.Option(
        "--max-shards", min=0, help="Read rows (plots, gallery, reject examples) from at most this many shards per "
                                    "stage, a sample seeded by --seed; 0: every shard. The funnel counts every shard.")
    ] = DEFAULT_MAX_SHARDS,
    all_shards: Annotated[bool, typer.Option(
        "--all-shards", help="Read rows from every committed shard (as --max-shards 0), one shard at a time.")
    ] = False,
    max_candidates: Annotated[int, typer.Option("--max-candidates", min=0,
                                                help="Candidate boxes drawn per gallery image (best first).")] = 40,
    as_json: JsonOpt = False,
) -> None:
    """Write RUN/report/index.html (self-contained: funnel, plots, gallery, rejects) and RUN/report/summary.json."""
    import json

    from grit_pipeline.report.build import ReportOptions, build_report
    from grit_pipeline.report.funnel import totals

    console = Console(stderr=True)
    report = build_report(run, ReportOptions(sample=sample, seed=seed, examples_per_reason=examples,
                                             max_shards=None if all_shards else max_shards,
                                             max_candidates=max_candidates))
    rows_in, rows_out = totals(report.summary)
    if as_json:
        print(json.dumps({"index": report.index_url, "summary": report.summary_url, "rows_in": rows_in,
                          "rows_out": rows_out, "gallery_keys": report.gallery_keys,
                          "sample": report.sample.to_json()}, indent=2, sort_keys=True))
        return
    last = next(reversed(report.summary["stages"]), "compose")
    sampled = report.sample.to_json()["stages"].values()
    read = "every committed shard" if report.sample.complete else (
        f"{max(s['sampled'] for s in sampled):,} of {max(s['committed'] for s in sampled):,} committed shards "
        f"(a sample seeded by --seed; --all-shards reads them all)")
    console.print(Text(f"{rows_in:,} rows in -> {rows_out:,} " + ("GrIT rows" if last == "compose" else
                                                                  f"rows out of {last}")
                       + f"; {len(report.gallery_keys)} rows in the gallery; rows read from {read}"))
    print(report.index_url)
    print(report.summary_url)


def _write_png(console: Console, trace, allowed, stage: str, out: str, labels: bool) -> None:
    import fsspec

    from grit_pipeline.report.boxes import BOX_STAGES, boxes_for_stage
    from grit_pipeline.report.drawing import draw_boxes
    from grit_pipeline.report.thumbnails import ImageUnavailable, open_image
    from stages.image_reader import ImageLocation

    if stage not in BOX_STAGES:
        _fail(console, f"--png draws boxes, which exist at stages {', '.join(BOX_STAGES)}; not at {stage!r}")
    if stage not in trace.reached:
        d = trace.dropped or {"stage": "?", "reason": "not in this stage's output"}
        _fail(console, f"row {trace.key} has no {stage} boxes: dropped at {d['stage']} ({d['reason']}); "
                       "try an earlier --stage")
    boxes = boxes_for_stage(stage, trace.row)
    try:
        image = open_image(ImageLocation.from_row(trace.row), allowed)
    except ImageUnavailable as e:
        _fail(console, f"row {trace.key}: image unavailable: {e}")
    with fsspec.open(out, "wb") as f:
        draw_boxes(image, boxes, labels=labels).save(f, format="PNG")
    console.print(Text(f"{len(boxes)} {stage} boxes of {trace.key} drawn on its {image.width}x{image.height} "
                       f"image -> {out}"))


def inspect_command(
    run: Annotated[str, typer.Argument(help="Run directory (local path or s3://...).")],
    stage: Annotated[StageName, typer.Option("--stage", "-s", help="Stage whose rows to show.")],
    key: Annotated[list[str] | None, typer.Option("--key", "-k", help="Row key to show (repeatable).")] = None,
    sample: Annotated[int, typer.Option("--sample", "-n", min=1, help="Rows to show when no --key is given.")] = 5,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sample (same seed, same rows).")] = 0,
    shard: Annotated[int | None, typer.Option("--shard", min=0, help="Look only in this source shard.")] = None,
    show_rejects: Annotated[bool, typer.Option("--rejects", help="Show the stage's rejected rows instead.")] = False,
    reason: Annotated[str | None, typer.Option(
        "--reason", help="With --rejects: only this reject reason (e.g. no_box; `grit stats RUN` lists them).")
    ] = None,
    png: Annotated[str | None, typer.Option("--png", help="Draw the first shown row's boxes on its image here.")
                   ] = None,
    labels: Annotated[bool, typer.Option("--labels/--no-labels", help="Label boxes in the --png.")] = True,
    max_candidates: Annotated[int, typer.Option("--max-candidates", min=0,
                                                help="Detector candidates listed per row.")] = 20,
) -> None:
    """Print rows of one stage (rich tables), or its rejects; --png draws a row's boxes on its image."""
    from grit_pipeline.report.inspect_render import print_rows, render_rejects
    from grit_pipeline.report.inspect_rows import rejects, rows_by_key, sample_rows
    from grit_pipeline.report.run_files import RunFiles

    console = Console()
    err = Console(stderr=True)
    files = RunFiles.open(run)  # NotARun, and InspectError below, are shown by `grit`'s one error handler
    if show_rejects:
        if png:
            _fail(err, "--png draws a row's boxes; it cannot be combined with --rejects")
        table = rejects(files, stage, n=len(key) if key else sample, keys=key, reason=reason, shard=shard)
        if table.num_rows == 0:
            err.print(Text(f"no rejects of {stage}" + (f" with reason {reason!r}" if reason else "")
                           + (" for the given keys" if key else "")))
        console.print(render_rejects(table, stage))
        return
    traces = (rows_by_key(files, stage, key, [shard] if shard is not None else None) if key
              else sample_rows(files, stage, sample, seed, shard))
    print_rows(console, traces, stage, max_candidates)
    if png:
        if not traces:
            _fail(err, "no row to draw")
        _write_png(err, traces[0], files.allowed_images, stage, png, labels)


def register(app: typer.Typer) -> None:
    """Add `report` and `inspect` to the `grit` CLI."""
    app.command("report")(report_command)
    app.command("inspect")(inspect_command)
