"""`grit stats` and the end of `grit run`: a run's merged funnel as a terminal table.

Reasons and counter names are read back from files in the run directory, so the table shows them through
`schemas.display.display_text` like any other untrusted text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def funnel_table(summary: Mapping[str, Any]):
    """The funnel as a rich Table (for `grit stats` and the end of `grit run`); stage counters (e.g. ingest's
    control_chars_removed) in its caption."""
    from rich.table import Table
    from rich.text import Text

    from schemas.display import display_text

    table = Table(title="GrIT funnel", caption_justify="left")
    for col in ("stage", "shards", "rows in", "rows out", "kept", "top rejects", "seconds"):
        table.add_column(col, justify="left" if col in ("stage", "top rejects") else "right")
    for row in summary.get("funnel", []):
        s = summary["stages"][row["stage"]]
        top = sorted(s["rejects"].items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        table.add_row(Text(display_text(row["stage"])), str(s["shards"]), f"{row['rows_in']:,}",
                      f"{row['rows_out']:,}", f"{row['kept_of_input']:.1%}",
                      Text(display_text(", ".join(f"{k} {v:,}" for k, v in top))), f"{s['seconds']:.1f}")
    counted = [f"{stage}: " + ", ".join(f"{k} {v:,}" for k, v in s["counters"].items())
               for stage, s in summary.get("stages", {}).items() if s.get("counters")]
    if counted:
        table.caption = Text(display_text("; ".join(counted)), style="dim")
    return table
