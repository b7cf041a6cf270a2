"""`grit status RUN [--json] [--watch SECONDS]`: how far a run is, from another terminal or machine.

Reads only the run directory (`grit_pipeline.commands.status`), never takes the lease. `--json` prints the status
object (with `--watch`, one JSON object per line per refresh); `--watch` redraws every SECONDS until
Ctrl-C. Text from the run directory (failure messages, the lease holder's command) is shown through
`schemas.display.display_text`. `grit_pipeline.cli` adds the command with `register(app)`.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import typer

from grit_pipeline.commands.options import RunArg

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the status as JSON (one object per line with --watch).")]
WatchOpt = Annotated[float | None, typer.Option("--watch", min=0.5, metavar="SECONDS",
                                                help="Refresh every SECONDS until Ctrl-C.")]
WindowOpt = Annotated[float, typer.Option("--window", min=1.0, metavar="SECONDS",
                                          help="Throughput over the last SECONDS.")]
RebuildOpt = Annotated[bool, typer.Option(
    "--rebuild", help="First write the stages' ledgers from their _done markers (a run directory from before "
    "ledgers, or one whose ledger was damaged); refused while a live `grit run` holds the run.")]
MESSAGE_CHARS = 240


def lease_line(lease: dict[str, Any] | None) -> str:
    """One line about the lease, escaped (its fields come from a file anyone with access could write)."""
    from grit_pipeline.rundir.lease import describe_holder, heartbeat_text
    from schemas.display import display_text

    if lease is None:
        return "lease: none (no `grit run` is writing into this run directory)"
    holder, beat = describe_holder(lease), heartbeat_text(lease)
    if lease.get("live"):
        return display_text(f"lease: held by {holder}, {beat}")
    return display_text(f"lease: stale, {beat} by {holder}: that run crashed or was killed; the next "
                        "`grit run` takes the lease over")


def render(status: dict[str, Any]):
    """The status as rich renderables (a Group): lease, per-stage table, final shards, ETA, failures, logs."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from grit_pipeline.rundir.lease import age_text
    from schemas.display import display_text

    def num(v: Any) -> str:
        return "-" if v is None else f"{v:,}"

    def duration(seconds: float | None) -> str:
        return "unknown" if seconds is None else age_text(seconds)

    window = duration(status["window_s"])
    table = Table(title=Text(display_text(f"{status['run']}  at {status['now']}")), title_justify="left")
    for col in ("stage", "committed", "in flight", "failed", "pending", "rows in", "rows out",
                f"shards/min ({window})", "rows/min", "ETA"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for s in status["stages"]:
        table.add_row(Text(display_text(s["stage"])), num(s["committed"]), num(s.get("inflight")),
                      Text(num(s["failed"]), style="red" if s["failed"] else ""), num(s["pending"]),
                      num(s["rows_in"]), num(s["rows_out"]), f"{s['shards_per_min']:.2f}", f"{s['rows_per_min']:,.0f}",
                      "-" if not s["pending"] else duration(s["eta_s"]))
    planned = status["planned_shards"]
    parts: list[Any] = [Text(lease_line(status["lease"])), table,
                        Text(f"final shards published: {status['final_shards']:,}"
                             + (f" of {planned:,} planned" if planned is not None else "")
                             + (f"; ETA {duration(status['eta_s'])}" if status["eta_s"] else ""))]
    if status["failures"]:
        parts.append(Text(f"{status['failures']:,} shard failure(s) recorded; the latest:", style="red"))
        for f in status["latest_failures"]:
            what = f"{f.get('error_type') or 'error'}: {f.get('message') or ''}"
            if len(what) > MESSAGE_CHARS:
                what = what[: MESSAGE_CHARS - 1] + "…"
            key = f" key {f['key']}" if f.get("key") else ""
            parts.append(Text(display_text(f"  {f.get('time')} {f.get('stage')} shard {f.get('shard')}{key}: {what}")))
    for url in status["logs"][-3:]:
        parts.append(Text(display_text(f"log: {url}")))
    return Group(*parts)


def status_command(run: RunArg, as_json: JsonOpt = False, watch: WatchOpt = None, window: WindowOpt = 600.0,
                   rebuild: RebuildOpt = False) -> None:
    """Live status of a run: per stage committed / in flight / failed / pending shards, rows, throughput, ETA,
    lease. Reads the stages' ledgers and progress.json: a few dozen objects whatever the run's size."""
    from rich.console import Console

    from grit_pipeline.commands.status import StatusReader, rebuild_ledgers
    from grit_pipeline.rundir.store import RunDir

    if rebuild:  # NotARun, a live lease: shown by `grit`'s one error handler
        rebuilt = rebuild_ledgers(RunDir(run))
        typer.echo("ledgers written: " + ", ".join(f"{k} {v:,} shards" for k, v in rebuilt.items()), err=True)
    reader = StatusReader(RunDir(run))
    console = Console(width=None if sys.stdout.isatty() else 160)

    def read() -> dict[str, Any]:
        return reader.read(window)  # NotARun: shown by `grit`'s one error handler

    status = read()
    if watch is None:
        if as_json:
            typer.echo(json.dumps(status, indent=2))
        else:
            console.print(render(status))
        return
    try:
        if as_json:
            while True:
                typer.echo(json.dumps(status))
                time.sleep(watch)
                status = read()
        from rich.live import Live

        with Live(render(status), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(watch)
                try:
                    status = read()
                except OSError as e:  # a store hiccup: say so, try again next time
                    from rich.text import Text

                    from schemas.display import display_text

                    live.update(Text(display_text(f"cannot read {run}: {e}; retrying every {watch:g} s")),
                                refresh=True)
                    continue
                live.update(render(status), refresh=True)
    except KeyboardInterrupt:
        return


def register(app: typer.Typer) -> None:
    """Add `status` to the `grit` CLI."""
    app.command("status")(status_command)
