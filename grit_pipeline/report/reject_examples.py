"""Examples of rejected rows per stage and reason, for the report's browsable rejects section.

The counts per reason are the run's summary (every shard); the examples come from the report's sampled
shards (`grit_pipeline.report.shard_sample`): their rejects files are read shard by shard, stopping as soon
as every reason of the stage has enough examples, then the captions of just those keys are looked up in
`ingest`. A rare reason may have no example in the sample; the page says so.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from grit_pipeline.report.run_files import RunFiles


@dataclass
class RejectExample:
    key: str
    shard: int
    detail: str
    caption: str | None = None


@dataclass
class RejectGroup:
    stage: str
    reason: str
    count: int
    examples: list[RejectExample] = field(default_factory=list)


def reject_groups(run: RunFiles, summary: dict, shards_of: Callable[[str], Sequence[int]],
                  per_reason: int = 5) -> list[RejectGroup]:
    """One group per stage and reason of `summary`, with up to `per_reason` examples from the shards
    `shards_of(stage)` names."""
    groups: list[RejectGroup] = []
    for stage, stats in summary["stages"].items():
        wanted = {reason: RejectGroup(stage, reason, n) for reason, n in stats["rejects"].items() if n}
        if not wanted:
            continue
        for shard in shards_of(stage):
            if all(len(g.examples) >= min(per_reason, g.count) for g in wanted.values()):
                break
            for r in run.read_rejects(stage, [shard]).to_pylist():
                g = wanted.get(r["reason"])
                if g is None:  # a reason the stats do not list; show it anyway
                    g = wanted[r["reason"]] = RejectGroup(stage, r["reason"], 0)
                if len(g.examples) < per_reason:
                    g.examples.append(RejectExample(r["key"], shard, r["detail"] or ""))
        groups.extend(wanted.values())
    _attach_captions(run, groups)
    return groups


def _attach_captions(run: RunFiles, groups: list[RejectGroup]) -> None:
    if run.stage_dir("ingest") is None:
        return
    by_shard: dict[int, list[RejectExample]] = defaultdict(list)
    for g in groups:
        if g.stage == "ingest":  # rows ingest rejected are not in its output
            continue
        for e in g.examples:
            by_shard[e.shard].append(e)
    committed = set(run.shards("ingest"))
    for shard, examples in sorted(by_shard.items()):
        if shard not in committed:
            continue
        t = run.read("ingest", [shard], columns=["key", "caption"], keys=[e.key for e in examples])
        captions = dict(zip(t["key"].to_pylist(), t["caption"].to_pylist(), strict=True))
        for e in examples:
            e.caption = captions.get(e.key)
