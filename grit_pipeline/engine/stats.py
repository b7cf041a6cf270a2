"""Per-shard stage statistics and their merge (`report/summary.json`; `grit stats` shows it through
`grit_pipeline.commands.stats`).

Each committed shard of each stage has a `stats.json`:
`{stage, shard, fingerprint, rows_in, rows_out, rejects: {reason: n}, counters: {name: n}, seconds,
peak_rss_mb}`, where `counters` are the stage's `StageResult.counters` (things it did to rows it passed on,
e.g. ingest's `control_chars_removed`; absent in files written before they existed), `seconds` is the
worker time spent on the shard and `peak_rss_mb` the largest peak RSS of the worker processes that handled
it. Every row a stage receives is either output or rejected, so `rows_in == rows_out + sum(rejects)` holds
for every stage and shard; `ShardStats` refuses anything else. `merge` sums rejects and counters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator


class ShardStats(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str
    shard: int
    fingerprint: str
    rows_in: int = Field(ge=0)
    rows_out: int = Field(ge=0)
    rejects: dict[str, int] = Field(default_factory=dict)
    counters: dict[str, int] = Field(default_factory=dict)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0

    @model_validator(mode="after")
    def _balanced(self) -> ShardStats:
        dropped = sum(self.rejects.values())
        if self.rows_in != self.rows_out + dropped:
            raise ValueError(
                f"stage {self.stage!r} shard {self.shard}: rows_in {self.rows_in} != rows_out "
                f"{self.rows_out} + rejects {dropped} ({self.rejects})")
        return self

    def to_json(self) -> dict[str, Any]:
        data = self.model_dump()
        data["rejects"] = dict(sorted(self.rejects.items()))
        data["counters"] = dict(sorted(self.counters.items()))
        data["seconds"] = round(self.seconds, 4)
        data["peak_rss_mb"] = round(self.peak_rss_mb, 1)
        return data


def reject_counts(rejects: pa.Table) -> dict[str, int]:
    """{reason: n} of a reject table, sorted by reason."""
    if rejects.num_rows == 0:
        return {}
    counts = pc.value_counts(rejects["reason"]).to_pylist()
    return {c["values"]: c["counts"] for c in sorted(counts, key=lambda c: c["values"])}


def shard_stats(stage: str, shard: int, fingerprint: str, rows_in: int, output: pa.Table,
                rejects: pa.Table, seconds: float = 0.0, peak_rss_mb: float = 0.0, *,
                counters: Mapping[str, int] | None = None) -> ShardStats:
    """Stats of one committed shard; `counters` is the stage's `StageResult.counters` (summed over the
    shard's batches when it ran in several)."""
    return ShardStats(stage=stage, shard=shard, fingerprint=fingerprint, rows_in=rows_in,
                      rows_out=output.num_rows, rejects=reject_counts(rejects), counters=dict(counters or {}),
                      seconds=seconds, peak_rss_mb=peak_rss_mb)


def merge(stage_order: Sequence[str], per_stage: Mapping[str, Iterable[Mapping[str, Any]]],
          fingerprints: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Totals per stage and the funnel over the stages that have stats, from per-shard stats documents."""
    stages: dict[str, Any] = {}
    for stage in stage_order:
        docs = [ShardStats.model_validate(d) for d in per_stage.get(stage, ())]
        if not docs:
            continue
        rejects: Counter[str] = Counter()
        counters: Counter[str] = Counter()
        for d in docs:
            rejects.update(d.rejects)
            counters.update(d.counters)
        stages[stage] = {
            "fingerprint": (fingerprints or {}).get(stage, docs[0].fingerprint),
            "shards": len(docs),
            "rows_in": sum(d.rows_in for d in docs),
            "rows_out": sum(d.rows_out for d in docs),
            "rejects": dict(sorted(rejects.items())),
            "counters": dict(sorted(counters.items())),
            "seconds": round(sum(d.seconds for d in docs), 3),
            "peak_rss_mb": round(max(d.peak_rss_mb for d in docs), 1),
        }
    return summarize(stages)


def summarize(stages: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The run summary from per-stage totals (in stage order): `{"stages": ..., "funnel": [...]}`."""
    funnel = []
    first_in = next(iter(stages.values()))["rows_in"] if stages else 0
    for stage, s in stages.items():
        funnel.append({
            "stage": stage,
            "rows_in": s["rows_in"],
            "rows_out": s["rows_out"],
            "dropped": s["rows_in"] - s["rows_out"],
            "kept_of_input": round(s["rows_out"] / first_in, 4) if first_in else 0.0,
        })
    return {"stages": dict(stages), "funnel": funnel}
