"""The per-stage funnel (rows in, rows out, rejects by reason, seconds) as the report shows it.

The numbers are the engine's merged stats (`grit_pipeline.engine.stats.merge`, the content of
`report/summary.json`) taken as they are, so the HTML funnel and summary.json agree number for number.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FunnelRow:
    stage: str
    shards: int
    rows_in: int
    rows_out: int
    rejects: dict[str, int]  # reason -> rows, most frequent first
    seconds: float
    counters: dict[str, int] = field(default_factory=dict)  # what the stage did to rows it kept, by name

    @property
    def rejected(self) -> int:
        return sum(self.rejects.values())

    @property
    def kept_share(self) -> float:
        return self.rows_out / self.rows_in if self.rows_in else 0.0


def funnel_rows(summary: dict) -> list[FunnelRow]:
    return [FunnelRow(stage=stage, shards=s["shards"], rows_in=s["rows_in"], rows_out=s["rows_out"],
                      rejects=dict(sorted(s["rejects"].items(), key=lambda kv: (-kv[1], kv[0]))),
                      seconds=s["seconds"], counters=dict(s.get("counters") or {}))
            for stage, s in summary["stages"].items()]


def totals(summary: dict) -> tuple[int, int]:
    """(rows into the first stage, rows out of the last one)."""
    stages = list(summary["stages"].values())
    return (stages[0]["rows_in"], stages[-1]["rows_out"]) if stages else (0, 0)
