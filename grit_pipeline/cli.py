"""The `grit` command line: `run`, `plan`, `stats`, `validate`, plus the commands other modules register
(`report`, `inspect`, `train`, `eval`, `synth`, `export`, `download`, `calibrate`).

    grit run -c configs/demo.yaml --input data/sample --output runs/demo select.min_score=0.7
    grit plan -c configs/demo.yaml --input data/sample --output runs/demo
    grit stats runs/demo
    grit validate runs/demo

Start-up stays fast: nothing heavy (torch, spaCy, Ray) is imported until a command needs it.

Errors: every sub-command runs inside `GritGroup.invoke`, the one place that turns a user-facing error
(`grit_pipeline.errors`: `UserError` -- config, plan, not a run, a file that is not what it should be -- and
the OS errors about a path) into `error: <message>` on stderr, escaped for display, and its exit code; with
`grit --debug` or `GRIT_DEBUG=1` the traceback is shown instead. Any other exception is a bug and keeps its
traceback. Exit codes: 0 success, 1 some shards failed / a download failed / validation found problems,
2 a usage, config or input error, 130/143 a run stopped by SIGINT/SIGTERM.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from grit_pipeline.commands.options import JsonOpt
from grit_pipeline.errors import FAILED_EXIT, PATH_ERRORS, USAGE_EXIT, UserError, user_message
from schemas.location import LocationEncoder
from stages.registry import StageName


class GritGroup(TyperGroup):
    """The `grit` command group; its `invoke` runs every sub-command, so its error handling covers them all
    (module docstring)."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (UserError, *PATH_ERRORS) as e:
            if ctx.params.get("debug"):
                raise
            typer.echo(f"error: {user_message(e)}", err=True)
            raise typer.Exit(getattr(e, "exit_code", USAGE_EXIT)) from None


app = typer.Typer(
    cls=GritGroup,
    name="grit",
    help="Build GrIT (the grounded image-text corpus of Kosmos-2) from image-caption data on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules that add their own commands through `register(app)`; each is imported only if it exists.
COMMAND_MODULES = ("grit_pipeline.report.commands", "grit_pipeline.train.commands", "grit_pipeline.commands.download",
                   "grit_pipeline.commands.status_cli", "grit_pipeline.commands.calibrate")

# Options shared by several commands; the trainer's and the report's commands use the same flag names
# (`--config/-c`, `--out/--output/-o`, `--json`, `--seed`, `--sample/-n`); `--json` and the run directory
# argument are defined once for all of them in `grit_pipeline.commands.options`.
ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="YAML config; stage defaults without one.")]
InputOpt = Annotated[str | None, typer.Option("--input", "-i", help="Source URI (img2dataset folder, Parquet, ...).")]
OutputOpt = Annotated[str, typer.Option("--output", "--out", "-o",
                                        help="Run directory (local path or s3://...).")]
OverridesArg = Annotated[list[str] | None, typer.Argument(help="Config overrides, e.g. select.min_score=0.7.",
                                                          show_default=False)]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, help="Only the first N source rows.")]
ShardsOpt = Annotated[str | None, typer.Option("--shards", help="Source shards to process, e.g. 0-9,12.")]
FromOpt = Annotated[StageName | None, typer.Option("--from", help="First stage to run (earlier ones must be cached).")]
ToOpt = Annotated[StageName | None, typer.Option("--to", help="Last stage to run.")]


def _print_version(value: bool) -> None:
    if value:
        from grit_pipeline.version import __version__

        typer.echo(f"grit-pipeline {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the grit-pipeline version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", envvar="GRIT_DEBUG",
                                        help="Show the full traceback of an error instead of one line.")] = False,
) -> None:
    pass  # `debug` is read by GritGroup.invoke


def _console():
    from rich.console import Console

    # rich falls back to 80 columns when not on a terminal, which folds the plan table in logs
    return Console(width=None if sys.stdout.isatty() else 160)


def _load(config: str | None, overrides: list[str] | None, address: str | None = None,
          num_cpus: int | None = None, no_progress: bool = False):
    from grit_pipeline.config import load_config

    extra = list(overrides or [])
    if address is not None:
        extra.append(f"run.address={address}")
    if num_cpus is not None:
        extra.append(f"run.num_cpus={num_cpus}")
    if no_progress:
        extra.append("run.progress=false")
    return load_config(config, extra)


def _fail(message: str, code: int = USAGE_EXIT) -> None:
    from schemas.display import display_text

    typer.echo(f"error: {display_text(message)}", err=True)
    raise typer.Exit(code)


@app.command()
def run(
    output: OutputOpt,
    overrides: OverridesArg = None,
    config: ConfigOpt = None,
    input: InputOpt = None,  # noqa: A002 - the flag is --input
    limit: LimitOpt = None,
    shards: ShardsOpt = None,
    from_stage: FromOpt = None,
    to_stage: ToOpt = None,
    address: Annotated[str | None, typer.Option(
        "--address", help="Ray cluster: auto, ray://host:10001 or host:6379 (default: start local Ray).")] = None,
    num_cpus: Annotated[int | None, typer.Option("--num-cpus", min=1, help="CPUs of the local Ray.")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False,
) -> None:
    """Run the pipeline: every stage over every pending shard, committing shard by shard."""
    from grit_pipeline.config import shards_of
    from grit_pipeline.engine.plan import build_plan
    from grit_pipeline.engine.runner import execute
    from grit_pipeline.logs import basic_config  # escapes control characters in log lines
    from grit_pipeline.rundir.runlog import LOG_FORMAT
    from schemas.display import display_text

    basic_config(level=logging.INFO, format=LOG_FORMAT)
    cfg = _load(config, overrides, address, num_cpus, no_progress)
    plan = build_plan(cfg, input_uri=input, output_uri=output, shards=shards, limit=limit,
                      from_stage=from_stage, to_stage=to_stage)
    from grit_pipeline.rundir.lease import LeaseHeld, LeaseLost

    try:
        result = execute(plan, command=resume_command())
    except LeaseHeld as e:
        _fail(str(e))
    except LeaseLost as e:  # taken over mid-run: this run stopped writing; its committed shards stay
        _fail(str(e), FAILED_EXIT)
    except OSError as e:  # the run directory itself cannot be written
        _fail(f"cannot write the run directory {output}: {e}", FAILED_EXIT)
    console = _console()
    total = len(plan.shards)
    for outcome in result.stages:
        console.print(f"{outcome.name:<8} {outcome.fingerprint}  computed {len(outcome.computed)}  "
                      f"cached {len(outcome.cached)}  failed {len(outcome.failed)}  "
                      f"committed {len(outcome.computed) + len(outcome.cached)} of {total}", markup=False)
    from grit_pipeline.commands.stats import funnel_table

    console.print(funnel_table(result.summary))
    console.print(f"final shards: {plan.rundir.url('grit')} ({shards_of(result.final_shards) or 'none'})",
                  markup=False, highlight=False)
    if result.failures:
        console.print(f"[red]{len(result.failures)} shard(s) failed:[/red]")
        for f in result.failures:
            console.print(f"  {display_text(str(f))}", markup=False, highlight=False)
    if result.stopped:
        console.print(f"stopped by {result.stopped}: what is committed above stays; resume with", markup=False)
        typer.echo(f"  {resume_command()}")  # one line, never wrapped: it is meant to be copied
        raise typer.Exit(result.exit_code)
    if not result.ok:
        raise typer.Exit(FAILED_EXIT)


def resume_command() -> str:
    """The command line of this `grit run`, which resumes it (committed shards are skipped)."""
    import shlex

    return shlex.join(["grit", *sys.argv[1:]])


@app.command()
def plan(
    output: OutputOpt,
    overrides: OverridesArg = None,
    config: ConfigOpt = None,
    input: InputOpt = None,  # noqa: A002
    limit: LimitOpt = None,
    shards: ShardsOpt = None,
    from_stage: FromOpt = None,
    to_stage: ToOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Dry run: resolved config, stages with resources and fingerprints, cached and pending shards."""
    from grit_pipeline.config import dump_config, shards_of
    from grit_pipeline.engine.plan import build_plan

    cfg = _load(config, overrides)
    p = build_plan(cfg, input_uri=input, output_uri=output, shards=shards, limit=limit,
                   from_stage=from_stage, to_stage=to_stage)
    if as_json:
        typer.echo(json.dumps({**p.to_dict(), "config": json.loads(json.dumps(p.config.model_dump(mode="json")))},
                              indent=2))
        return
    from rich.table import Table

    console = _console()
    console.rule("resolved config")
    console.print(dump_config(p.config), markup=False, highlight=False)
    table = Table(title=f"plan: {len(p.shards)} shard(s) of {p.input_uri} -> {p.rundir.uri}")
    for col in ("stage", "v", "fingerprint", "runs as", "cpus", "gpus", "pool", "batch", "cached", "pending"):
        table.add_column(col)
    for s in p.stages:
        res = s.resources
        table.add_row(s.name if s.selected else f"({s.name})", str(s.cls.version), s.fingerprint, s.kind,
                      f"{res.cpus:g}", f"{res.gpus:g}", str(res.pool_size) if res.actor else "-",
                      str(res.batch_size or "shard"), shards_of(s.cached) or "-", shards_of(s.pending) or "-")
    console.print(table)


@app.command()
def stats(
    run_dir: Annotated[str, typer.Argument(help="Run directory.")],
    as_json: JsonOpt = False,
) -> None:
    """The merged funnel of a run: rows in/out and rejects by reason per stage."""
    from grit_pipeline.commands.stats import funnel_table
    from grit_pipeline.engine.summary import summary_from_run
    from schemas.display import display_text

    summary = summary_from_run(run_dir)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    console = _console()
    console.print(funnel_table(summary))
    for stage, s in summary["stages"].items():
        if s["rejects"]:
            console.print(display_text(f"{stage}: " + ", ".join(f"{k} {v:,}" for k, v in s["rejects"].items())),
                          markup=False, highlight=False)


@app.command()
def validate(
    path: Annotated[str, typer.Argument(help="Run directory (checks grit/), a folder of shards or one file.")],
    encoder: Annotated[LocationEncoder | None, typer.Option(
        "--encoder", help="Location encoder the grounded captions were built with; default: the run's.")] = None,
    workers: Annotated[int, typer.Option(
        "--workers", min=1, help="Shards read and checked at once (each is held in memory while checked).")] = 4,
    as_json: JsonOpt = False,
) -> None:
    """Check final shards against the GRIT schema and invariants; exit 1 on any problem.

    Memory stays bounded whatever the run's size: --workers shards are
    checked at once, then a k-way merge of their sorted key hashes (64 files
    at once, about 100 MB) finds keys in two shards, confirmed with the real
    keys."""
    from grit_pipeline.commands.validate import validate_run

    report = validate_run(path, encoder=encoder, workers=workers)
    if as_json:  # `ok` is false when no shard was found
        typer.echo(json.dumps({"files": report.files, "rows": report.rows, "ok": report.ok,
                               "problems": [str(p) for p in report.problems]}, indent=2))
        raise typer.Exit(0 if report.ok else FAILED_EXIT)
    for p in report.problems[:200]:
        typer.echo(str(p), err=True)
    if not report.files:
        _fail(f"{path}: no final shards found", FAILED_EXIT)  # nothing to validate fails the validation
    status = "OK" if report.ok else f"{len(report.problems)} problem(s)"
    typer.echo(f"{len(report.files)} shard(s), {report.rows:,} rows: {status}")
    if not report.ok:
        raise typer.Exit(FAILED_EXIT)


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package is missing
            found = False
        if found:
            importlib.import_module(name).register(app)


_register_commands()


def main() -> None:  # `python -m grit_pipeline.cli`
    app()


if __name__ == "__main__":
    sys.exit(main())
