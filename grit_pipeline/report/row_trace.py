"""Follow a few rows through a run: their columns at the stages asked for, and where they were dropped.

Reads one source shard per call, only the named keys (pushed into the Parquet scan) and only the
columns the report and `grit inspect` show, so tracing a handful of rows of a large run on object storage
costs a few footers and row groups, not the stage outputs. Rejects files are read only for rows that
went missing, to say which stage dropped them and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from grit_pipeline.report.run_files import RunFiles
from stages.registry import STAGE_ORDER

# Columns shown (or, for image_offset/image_size, used to read the image) per stage, besides `key`; a
# stage's passthrough columns are left in the files.
SHOWN_COLUMNS: dict[str, tuple[str, ...]] = {
    "ingest": ("shard", "url", "caption", "width", "height", "image_ref", "image_offset", "image_size"),
    "chunks": ("chunks",),
    "detect": ("candidates",),
    "select": ("pairs",),
    "compose": ("noun_chunks", "ref_exps", "grounded_caption", "markdown_caption"),
}


@dataclass
class RowTrace:
    key: str
    shard: int
    row: dict = field(default_factory=dict)  # merged columns of the stages read that hold the row
    reached: list[str] = field(default_factory=list)  # stages read whose output holds the row
    dropped: dict | None = None  # {"stage", "reason", "detail"} of the stage that rejected it


def trace_rows(run: RunFiles, shard: int, keys: Sequence[str], stages: Sequence[str] | None = None) -> list[RowTrace]:
    """Traces of `keys` (all from source shard `shard`), in the order given, reading the outputs of
    `stages` (default: all, in pipeline order)."""
    wanted = [s for s in STAGE_ORDER if s in set(stages or STAGE_ORDER)]
    traces = {k: RowTrace(key=k, shard=shard) for k in keys}
    pending = list(dict.fromkeys(keys))
    last_read = None
    for stage in wanted:
        if not pending or run.stage_dir(stage) is None or shard not in run.shard_set(stage):
            break  # stage not run, or shard not committed yet (run in progress, or --to an earlier stage)
        table = run.read(stage, [shard], columns=["key", *SHOWN_COLUMNS.get(stage, ())], keys=pending,
                         missing_ok=True)
        found = {r["key"]: r for r in table.to_pylist()}
        for k, r in found.items():
            traces[k].row.update(r)
            traces[k].reached.append(stage)
        pending = [k for k in pending if k in found]
        last_read = stage
    missing = [k for k in traces if traces[k].dropped is None and last_read not in traces[k].reached]
    if missing and last_read is not None:
        _find_rejects(run, shard, missing, STAGE_ORDER[: STAGE_ORDER.index(last_read) + 1], traces)
    return [traces[k] for k in keys]


def _find_rejects(run: RunFiles, shard: int, keys: list[str], stages: Sequence[str],
                  traces: dict[str, RowTrace]) -> None:
    """Look each key up in the rejects of the stages after the last one whose output held it."""
    left = set(keys)
    for i, stage in enumerate(stages):
        candidates = sorted(k for k in left if not set(traces[k].reached) & set(stages[i:]))
        if not candidates:
            continue
        if run.stage_dir(stage) is None or shard not in run.shard_set(stage):
            continue
        for r in run.read_rejects(stage, [shard], keys=candidates).to_pylist():
            if r["key"] in left:
                traces[r["key"]].dropped = {"stage": stage, "reason": r["reason"], "detail": r["detail"] or ""}
                left.discard(r["key"])
