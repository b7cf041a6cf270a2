"""What `grit inspect` shows: rows of one stage (by key or a deterministic sample), or its rejects.

Reads as little as it can: a key is located through the `ingest` outputs' key column with the filter
pushed into the Parquet scan (row groups whose key statistics exclude it are skipped) and the search stops
at the first shard that holds it; a sample reads the key column of one shard. Then only that shard of the
context stages (`ingest` for caption and image, `chunks` for chunk texts) and of the asked stage is read.

Rows of `detect` also get, per candidate, what `select` does with it under the run's select config
(`SelectStage.explain`: kept, or which rule removed it), so the candidates list follows the NMS rule in
force (`select.nms_scope`, `select.nms_iou`) rather than a fixed one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from grit_pipeline.errors import UserError
from grit_pipeline.report.gallery import sample_keys
from grit_pipeline.report.measures import run_select_config
from grit_pipeline.report.row_trace import RowTrace, trace_rows
from grit_pipeline.report.run_files import RunFiles
from schemas.tables import CANDIDATE_TYPE, CHUNK_TYPE
from stages.registry import STAGE_ORDER
from stages.select import SelectStage


class InspectError(UserError, ValueError):
    """Bad `grit inspect` request (unknown stage, key not in the run, ...); the message says what to do."""


def check_stage(run: RunFiles, stage: str) -> None:
    if stage not in STAGE_ORDER:
        raise InspectError(f"unknown stage {stage!r}; stages are {', '.join(STAGE_ORDER)}")
    if run.stage_dir(stage) is None or not run.shards(stage):
        have = ", ".join(run.stages()) or "none"
        raise InspectError(f"{run.uri}: stage {stage!r} has no committed output (stages with output: {have})")


def context_stages(stage: str) -> list[str]:
    """The stages read to show a row of `stage`: ingest and chunks for context, then the stage itself."""
    upto = STAGE_ORDER[: STAGE_ORDER.index(stage) + 1]
    return [s for s in ("ingest", "chunks") if s in upto] + [stage]


def locate_keys(run: RunFiles, keys: Sequence[str], shards: Sequence[int] | None = None) -> dict[str, int]:
    """key -> source shard, searching the first stage with output (ingest) shard by shard, stopping once
    every key is found. Keys that ingest rejected are looked up in its rejects."""
    first = next((s for s in STAGE_ORDER if run.stage_dir(s) is not None), None)
    if first is None:
        return {}
    left, found = set(keys), {}
    for shard in shards if shards is not None else run.shards(first):
        if not left:
            break
        for k in run.read(first, [shard], columns=["key"], keys=sorted(left))["key"].to_pylist():
            found[k] = shard
            left.discard(k)
    for shard in shards if shards is not None else run.shards(first):
        if not left:
            break
        for k in run.read_rejects(first, [shard], keys=sorted(left))["key"].to_pylist():
            found[k] = shard
            left.discard(k)
    return found


def rows_by_key(run: RunFiles, stage: str, keys: Sequence[str], shards: Sequence[int] | None = None) -> list[RowTrace]:
    check_stage(run, stage)
    where = locate_keys(run, keys, shards)
    missing = [k for k in keys if k not in where]
    if missing:
        raise InspectError(f"{run.uri}: key {missing[0]!r} is in no shard of this run"
                           + (f" (searched shards {list(shards)})" if shards is not None else ""))
    by_shard: dict[int, list[str]] = defaultdict(list)
    for k in keys:
        by_shard[where[k]].append(k)
    traces = {}
    for shard, ks in sorted(by_shard.items()):
        for t in trace_rows(run, shard, ks, context_stages(stage)):
            traces[t.key] = t
    return _with_select_fates(run, stage, [traces[k] for k in keys])


def sample_rows(run: RunFiles, stage: str, n: int, seed: int = 0, shard: int | None = None) -> list[RowTrace]:
    """`n` rows of `stage`'s output, sampled by keyed hash from one shard (the first committed one, or
    `shard`), topped up from the next shards when it holds fewer."""
    check_stage(run, stage)
    committed = run.shards(stage)
    if shard is not None and shard not in committed:
        raise InspectError(f"{run.uri}: stage {stage!r} has no committed shard {shard}; committed: {_ranges(committed)}")
    order = [shard] if shard is not None else committed
    out: list[RowTrace] = []
    for s in order:
        if len(out) >= n:
            break
        keys = run.read(stage, [s], columns=["key"])["key"].to_pylist()
        out += trace_rows(run, s, sample_keys(keys, n - len(out), seed), context_stages(stage))
    return _with_select_fates(run, stage, out)


def _with_select_fates(run: RunFiles, stage: str, traces: list[RowTrace]) -> list[RowTrace]:
    """At `detect`, attach `select_fates` (one `stages.select.CandidateFate` per candidate) and `select_rule`
    (the config they follow) to the rows that reached detect."""
    shown = [t for t in traces if stage == "detect" and "detect" in t.reached]
    if not shown:
        return traces
    cfg = run_select_config(run.stage_config("select"))
    table = pa.table({
        "key": pa.array([t.key for t in shown], pa.string()),
        "candidates": pa.array([t.row.get("candidates") or [] for t in shown], pa.list_(CANDIDATE_TYPE)),
        "chunks": pa.array([t.row.get("chunks") or [] for t in shown], pa.list_(CHUNK_TYPE)),
    })
    rule = (f"select with min_score {cfg.min_score:g}, nms_scope {cfg.nms_scope}, nms_iou {cfg.nms_iou:g}"
            + (f", max_box_area {cfg.max_box_area:g}" if cfg.max_box_area is not None else "")
            + (f", max_pairs {cfg.max_pairs}" if cfg.max_pairs is not None else ""))
    for t, fates in zip(shown, SelectStage(cfg).explain(table), strict=True):
        t.row["select_fates"] = fates
        t.row["select_rule"] = rule
    return traces


def rejects(run: RunFiles, stage: str, n: int, keys: Sequence[str] | None = None, reason: str | None = None,
            shard: int | None = None) -> pa.Table:
    """Up to `n` reject rows of `stage` (key, reason, detail, shard, caption), shard by shard."""
    check_stage(run, stage)
    order = [shard] if shard is not None else run.shards(stage)
    parts, total = [], 0
    for s in order:
        if total >= n:
            break
        t = run.read_rejects(stage, [s], keys=keys)
        if reason is not None:
            t = t.filter(pc.equal(t["reason"], reason))
        t = t.slice(0, n - total)
        if t.num_rows:
            parts.append(_with_captions(run, t, s))
            total += t.num_rows
    if not parts:
        return pa.table({"key": pa.array([], pa.string()), "reason": pa.array([], pa.string()),
                         "detail": pa.array([], pa.string()), "shard": pa.array([], pa.int32()),
                         "caption": pa.array([], pa.string())})
    return pa.concat_tables(parts)


def _with_captions(run: RunFiles, rejected: pa.Table, shard: int) -> pa.Table:
    captions: dict[str, str] = {}
    if run.stage_dir("ingest") is not None and shard in run.shard_set("ingest"):
        t = run.read("ingest", [shard], columns=["key", "caption"], keys=rejected["key"].to_pylist())
        captions = dict(zip(t["key"].to_pylist(), t["caption"].to_pylist(), strict=True))
    return pa.table({"key": rejected["key"], "reason": rejected["reason"], "detail": rejected["detail"],
                     "shard": rejected["shard"],
                     "caption": pa.array([captions.get(k) for k in rejected["key"].to_pylist()], pa.string())})


def _ranges(shards: Sequence[int]) -> str:
    if not shards:
        return "none"
    return f"{shards[0]}-{shards[-1]} ({len(shards)} shards)" if len(shards) > 3 else ", ".join(map(str, shards))
