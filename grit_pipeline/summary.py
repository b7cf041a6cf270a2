"""A run's merged statistics (`<run>/report/summary.json`, `grit stats`, the report's funnel).

Merges the `stats.json` of every committed shard of every stage under the run's fingerprints, then adds
`publish`: how many compose rows became final rows and how many were dropped as cross-shard duplicate
keys (`grit_pipeline.publish` records). Reads only small files; nothing here depends on the rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from grit_pipeline import stats as stats_mod
from grit_pipeline.publish import PUBLISH, publish_records
from grit_pipeline.rundir import RunDir
from schemas.rows import RejectReason


class NotARun(FileNotFoundError):
    """A path that holds no run directory (no `run.yaml`)."""


def write_summary(rundir: RunDir, stage_order: Sequence[str], fingerprints: Mapping[str, str]) -> dict[str, Any]:
    """Merge every committed shard's stats under the given fingerprints into `report/summary.json`."""
    per_stage: dict[str, list[dict[str, Any]]] = {}
    for stage in stage_order:
        fp = fingerprints[stage]
        shards = sorted(rundir.committed(stage, fp))
        per_stage[stage] = list(rundir.read_stats(stage, fp, shards).values())
    order = list(stage_order)
    extra: dict[str, str] = {}
    if stage_order:
        last = stage_order[-1]
        published = publish_records(rundir, rundir.final_shards())
        docs = [_publish_stats(r, fingerprints[last]) for r in published.values()
                if r.get("compose_fingerprint") == fingerprints[last]]
        if docs:
            per_stage[PUBLISH] = docs
            order.append(PUBLISH)
            extra[PUBLISH] = fingerprints[last]
    summary = stats_mod.merge(order, per_stage, {**fingerprints, **extra})
    rundir.write_json("report/summary.json", summary)
    return summary


def _publish_stats(record: Mapping[str, Any], fingerprint: str) -> dict[str, Any]:
    dups = int(record.get("duplicates", 0))
    return {"stage": PUBLISH, "shard": int(record["shard"]), "fingerprint": fingerprint,
            "rows_in": int(record["rows_in"]), "rows_out": int(record["rows_out"]),
            "rejects": {RejectReason.DUPLICATE_KEY.value: dups} if dups else {}}


def run_fingerprints(rundir: RunDir) -> dict[str, str]:
    """The fingerprints recorded in a run's `run.yaml` (stage order)."""
    if not rundir.exists("run.yaml"):
        raise NotARun(f"{rundir.uri}: not a run directory (no run.yaml); pass the --output of a `grit run`")
    return dict(yaml.safe_load(rundir.read_bytes(rundir.path("run.yaml"))).get("fingerprints") or {})


def summary_from_run(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Re-merge the stats of an existing run (at the fingerprints its run.yaml records)."""
    rundir = RunDir(uri, storage_options)
    fps = run_fingerprints(rundir)
    return write_summary(rundir, list(fps), fps)
