"""Typer option and argument types shared by the `grit` commands of several modules (`grit_pipeline.cli`,
`grit_pipeline.report.commands`, `grit_pipeline.train.commands`, `grit_pipeline.commands.status_cli`), defined once
so that a flag reads the same everywhere. Cheap to import: typer only."""

from __future__ import annotations

from typing import Annotated

import typer

RunArg = Annotated[str, typer.Argument(help="Run directory (local path or s3://...), the --output of `grit run`.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of a table.")]
