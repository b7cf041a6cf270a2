"""A run's merged statistics (`<run>/report/summary.json`, `grit stats`, the report's funnel).

Per stage, the totals of every committed shard under the run's fingerprints come from the stage's
ledger (`grit_pipeline.rundir.ledger`: a summary plus the open segment, a few objects whatever the run's
size); then `publish` adds how many compose rows became final rows and how many were dropped as
cross-shard duplicate keys (the publish ledger's summary, `grit_pipeline.engine.publish.read_published`).
A run directory written before ledgers existed is folded from its markers and stats files once (and
`grit run` or `grit status --rebuild` writes its ledgers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from grit_pipeline.engine import stats as stats_mod
from grit_pipeline.engine.bookkeeping import records_from_markers
from grit_pipeline.engine.publish import PUBLISH, read_published
from grit_pipeline.rundir.ledger import StageFold, ledger_folder, read_ledger
from grit_pipeline.rundir.store import NotARun, RunDir
from grit_pipeline.shard_ranges import ShardRanges

__all__ = ["NotARun", "run_fingerprints", "summary_from_run", "write_summary"]


def committed_shards(rundir: RunDir, stage: str, fingerprint: str) -> ShardRanges:
    """The committed shards of `stage` under `fingerprint`: from its ledger (a few objects), or one listing
    of its `_done/` for a run directory from before ledgers."""
    fold, found = read_ledger(rundir, ledger_folder(stage, fingerprint))
    return fold.committed if found else ShardRanges(rundir.committed(stage, fingerprint))  # type: ignore[attr-defined]


def stage_fold(rundir: RunDir, stage: str, fingerprint: str) -> StageFold:
    """Everything committed of `stage` under `fingerprint`: its ledger, or (a run directory from before
    ledgers) the fold of its markers and stats files."""
    fold, found = read_ledger(rundir, ledger_folder(stage, fingerprint))
    if found:
        return fold  # type: ignore[return-value]
    fold = StageFold()
    for record in records_from_markers(rundir, stage, fingerprint, rundir.committed(stage, fingerprint)):
        fold.add(record)
    return fold


def write_summary(rundir: RunDir, stage_order: Sequence[str], fingerprints: Mapping[str, str], *,
                  folds: Mapping[str, StageFold] | None = None) -> dict[str, Any]:
    """Merge every stage's committed totals under the given fingerprints into `report/summary.json`;
    `folds` are ledgers the caller already holds (the end of a run), read otherwise."""
    stages: dict[str, Any] = {}
    for stage in stage_order:
        fp = fingerprints[stage]
        fold = (folds or {}).get(stage) or stage_fold(rundir, stage, fp)
        if fold.committed:
            stages[stage] = fold.stats(stage, fp)
    if stage_order:
        last = stage_order[-1]
        view, _ = read_published(rundir, fingerprints[last])
        if view.shards:
            stages[PUBLISH] = view.stats()
    summary = stats_mod.summarize(stages)
    rundir.write_json("report/summary.json", summary)
    return summary


def run_fingerprints(rundir: RunDir) -> dict[str, str]:
    """The fingerprints recorded in a run's `run.yaml` (stage order)."""
    return dict(rundir.read_run_yaml().get("fingerprints") or {})


def summary_from_run(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Re-merge the stats of an existing run (at the fingerprints its run.yaml records)."""
    rundir = RunDir(uri, storage_options)
    fps = run_fingerprints(rundir)
    return write_summary(rundir, list(fps), fps)
