"""Inspection of a run: `grit report` (self-contained HTML report + `report/summary.json`) and `grit inspect`
(rows and rejects of a stage in the terminal, boxes drawn on an image).

Reads the run directory written by the engine (DESIGN.md, "Run directory") through fsspec, column- and
shard-selectively, so it works the same on local disk and object storage. The CLI adds its commands with
`commands.register(app)`; the library entry points are `build_report` (here) and the functions of
`inspect_rows`. Nothing heavy is imported until used, so `grit --help` stays fast.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Report", "ReportOptions", "build_report"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from grit_pipeline.report import build

        return getattr(build, name)
    raise AttributeError(name)
