"""Which shards `grit report` reads rows from: a bounded, seeded sample of each stage's committed shards.

The plots, the kept-fraction curve, the gallery and the reject examples are computed over at most
`max_shards` shards per stage (default `DEFAULT_MAX_SHARDS`), so the report's memory and the objects it
reads are bounded by the sample, not by the run; the funnel and totals come from the run's summary and
cover every shard. `max_shards` None or 0 reads every committed shard (still one shard at a time).

The sample is a bottom-k sample under a keyed hash of the shard number: the `k` shards of smallest
`blake2b(shard, key=seed)`. So it is
- deterministic and seeded (`grit report --seed`, which also seeds the gallery), independent of listing
  order;
- a uniform random choice, hence spread over the whole run, not its first shards;
- consistent between stages: a shard sampled in a stage is sampled in every stage whose committed shards
  are a subset that still holds it among its k smallest ranks, so a finished run reads the same shards
  everywhere and a run in progress mostly so.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from grit_pipeline.shard_ranges import ShardRanges

DEFAULT_MAX_SHARDS = 64


def shard_rank(shard: int, seed: int) -> bytes:
    return hashlib.blake2b(str(int(shard)).encode(), digest_size=8, key=f"shards-{seed}".encode()).digest()


def sample_shards(shards: Iterable[int], max_shards: int | None, seed: int = 0) -> list[int]:
    """At most `max_shards` of `shards` (all for None or 0), chosen by keyed hash; ascending."""
    unique = sorted(set(int(s) for s in shards))
    if not max_shards or len(unique) <= max_shards:
        return unique
    return sorted(sorted(unique, key=lambda s: (shard_rank(s, seed), s))[:max_shards])


@dataclass(frozen=True)
class ShardSample:
    """The shards a report read, per stage, out of how many were committed."""

    seed: int
    max_shards: int | None  # None: every committed shard
    sampled: Mapping[str, tuple[int, ...]]  # stage -> sampled shards, ascending
    committed: Mapping[str, int]  # stage -> number of committed shards

    @classmethod
    def choose(cls, committed: Mapping[str, Iterable[int]], max_shards: int | None, seed: int = 0) -> ShardSample:
        """Sample every stage's committed shards (`stage -> shards`)."""
        limit = max_shards or None
        lists = {stage: sorted(set(shards)) for stage, shards in committed.items()}
        return cls(seed=seed, max_shards=limit,
                   sampled={stage: tuple(sample_shards(s, limit, seed)) for stage, s in lists.items()},
                   committed={stage: len(s) for stage, s in lists.items()})

    def of(self, stage: str) -> list[int]:
        """The sampled shards of `stage` (empty for a stage without output)."""
        return list(self.sampled.get(stage, ()))

    @property
    def complete(self) -> bool:
        """Whether every committed shard of every stage is read."""
        return all(len(self.sampled[s]) == self.committed[s] for s in self.sampled)

    def describe(self, stage: str) -> str:
        """'64 of 100,000 committed shards' / 'all 12 committed shards'."""
        n, total = len(self.sampled.get(stage, ())), self.committed.get(stage, 0)
        return f"all {total:,} committed shards" if n == total else f"{n:,} of {total:,} committed shards"

    def to_json(self) -> dict:
        """What `report/summary.json` (`sample`) and `grit report --json` record: per stage, how many shards
        were committed and which were read (`grit run --shards` syntax)."""
        return {"seed": self.seed, "max_shards": self.max_shards, "complete": self.complete,
                "stages": {stage: {"committed": self.committed[stage], "sampled": len(shards),
                                   "shards": str(ShardRanges(shards))}
                           for stage, shards in self.sampled.items()}}
