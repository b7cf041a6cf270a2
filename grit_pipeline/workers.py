"""The code that runs inside Ray workers: load a stage's input, run the stage, report each batch back.

Rows flow through Ray Data tagged with three internal columns: `__shard` (source shard), `__row` (position
in the shard's stage input) and `__total` (rows in that input). Every call of a stage's `process_batch`
ends in an *envelope*: one row per shard touched, holding the output and reject rows (Arrow IPC, each row
tagged with its `__row`), how many input rows the call covered, worker seconds, peak RSS, and an error
message if the call failed. The driver (`grit_pipeline.engine`) gathers envelopes per shard and commits a
shard once every one of its input rows is accounted for, so shards commit one by one while Ray streams.

Nothing here imports Ray: the functions are plain Arrow in, Arrow out, and are tested without a cluster.
"""

from __future__ import annotations

import logging
import resource
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from grit_pipeline.rundir import RunDir, shard_name
from grit_pipeline.stage_io import (
    StageOutputError,
    account_rows,
    conform_output,
    conform_rejects,
    join_upstream,
    passthrough_fields,
)
from schemas.tables import STAGE_SCHEMAS
from stages.base import Resources, Stage, StageConfig

log = logging.getLogger(__name__)

SHARD, ROW, TOTAL = "__shard", "__row", "__total"
REASON, DETAIL, ERROR = "__reason", "__detail", "__error"  # set by the prepare step
INTERNAL = (SHARD, ROW, TOTAL, REASON, DETAIL, ERROR)

ENVELOPE_SCHEMA = pa.schema([
    pa.field("shard", pa.int32(), nullable=False),
    pa.field("total", pa.int64(), nullable=False),  # rows in the shard's stage input
    pa.field("rows", pa.int64(), nullable=False),  # input rows this call covered
    pa.field("output", pa.large_binary()),  # Arrow IPC stream: output rows + `__row`
    pa.field("rejects", pa.large_binary()),  # Arrow IPC stream: REJECT_SCHEMA rows + `__row`
    pa.field("seconds", pa.float64(), nullable=False),
    pa.field("peak_rss_mb", pa.float64(), nullable=False),
    pa.field("error", pa.string()),
])
CULPRIT_SEARCH_MAX_ROWS = 256  # on a failed batch, retry up to this many rows one by one to name the key


@dataclass
class StageRuntime:
    """Everything a worker needs to run one stage; pickled into Ray tasks and actors."""

    name: str
    cls: type[Stage]
    config: StageConfig
    fingerprint: str
    resources: Resources
    rundir: RunDir
    upstream: tuple[tuple[str, str], ...] = ()  # (stage, fingerprint) of every earlier stage, in order
    extras: str = "none"  # extra output columns allowed: "any" (ingest), "passthrough" (compose), "none"
    sources: Mapping[int, Any] = field(default_factory=dict)  # ingest: shard -> SourceShard
    caps: Mapping[int, int] = field(default_factory=dict)  # ingest: shard -> max rows (run.limit)
    has_prepare: bool = False
    execution: Any = None  # the stage's Execution; None = its defaults

    @property
    def is_source(self) -> bool:
        return not self.upstream

    def input_desc(self, shard: int) -> str:
        if self.is_source:
            src = self.sources.get(shard)
            return str(getattr(src, "uri", src))
        stage, fp = self.upstream[-1]
        return self.rundir.url("stages", stage, fp, f"{shard_name(shard)}.parquet")


# --- stage instances, one per worker process -----------------------------------------------------------
_STAGES: dict[tuple[str, str, bool], Stage] = {}


def get_stage(rt: StageRuntime, setup: bool = True) -> Stage:
    """The worker's instance of the stage; `setup()` (model loading) runs once per process."""
    key = (rt.name, rt.fingerprint, setup)
    stage = _STAGES.get(key)
    if stage is None:
        stage = rt.cls(rt.config, rt.execution)
        if setup:
            stage.setup()
        _STAGES[key] = stage
    return stage


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# --- envelopes -----------------------------------------------------------------------------------------
def to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


def envelope(shard: int, total: int, rows: int, *, output: pa.Table | None = None,
             rejects: pa.Table | None = None, seconds: float = 0.0, error: str | None = None) -> dict:
    return {
        "shard": shard, "total": total, "rows": rows,
        "output": to_ipc(output) if output is not None else None,
        "rejects": to_ipc(rejects) if rejects is not None else None,
        "seconds": seconds, "peak_rss_mb": peak_rss_mb(), "error": error,
    }


def envelopes_table(envs: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(envs, schema=ENVELOPE_SCHEMA)


def with_rows(table: pa.Table, rows: np.ndarray) -> pa.Table:
    return table.append_column(pa.field(ROW, pa.int64(), nullable=False), pa.array(rows, pa.int64()))


def drop_internal(table: pa.Table) -> pa.Table:
    return table.drop_columns([c for c in table.column_names if c in INTERNAL])


def groups_by_shard(batch: pa.Table) -> Iterator[tuple[int, pa.Table]]:
    """Split a batch (which may straddle shards) into per-shard pieces, in order of first appearance."""
    shards = batch[SHARD].to_numpy()
    if len(shards) == 0:
        return
    if (shards == shards[0]).all():
        yield int(shards[0]), batch
        return
    for s in dict.fromkeys(shards.tolist()):
        yield int(s), batch.filter(pa.array(shards == s))


# --- failures ------------------------------------------------------------------------------------------
def describe_failure(rt: StageRuntime, shard: int, inp: pa.Table | None, exc: BaseException,
                     stage: Stage | None = None, prepare: bool = False) -> str:
    where = f"stage {rt.name!r}{' (prepare_batch)' if prepare else ''} failed on shard {shard} ({rt.input_desc(shard)})"
    what = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    log.error("%s: %s\n%s", where, what, "".join(traceback.format_exception(exc)))
    if isinstance(exc, StageOutputError) or inp is None or "key" not in inp.column_names or inp.num_rows == 0:
        return f"{where}: {what}"
    culprit = _find_culprit(stage, inp, prepare) if stage is not None else None
    if culprit is not None:
        return f"{where} at key {culprit!r}: {what}"
    keys = inp["key"]
    return f"{where} in a batch of {inp.num_rows} rows (keys {keys[0].as_py()!r}..{keys[-1].as_py()!r}): {what}"


def _find_culprit(stage: Stage, inp: pa.Table, prepare: bool) -> str | None:
    if inp.num_rows > CULPRIT_SEARCH_MAX_ROWS:
        return None
    fn = stage.prepare_batch if prepare else stage.process_batch
    for i in range(inp.num_rows):
        try:
            fn(inp.slice(i, 1))
        except Exception:  # noqa: BLE001 - any failure on this one row names it
            return inp["key"][i].as_py()
    return None


# --- the source stage (ingest): one call per whole source shard ----------------------------------------
def run_source_shard(rt: StageRuntime, stage: Stage, shard: int) -> dict:
    t0 = time.perf_counter()
    raw = None
    try:
        raw = stage.read(rt.sources[shard])  # type: ignore[attr-defined]
        cap = rt.caps.get(shard)
        if cap is not None and raw.num_rows > cap:
            raw = raw.slice(0, cap)
        res = stage.process_batch(raw)
        out = conform_output(rt.name, res.output, rt.cls.output_schema, allowed_extra=None)
        rej = conform_rejects(rt.name, res.rejects)
        if out.num_rows + rej.num_rows != raw.num_rows:
            raise StageOutputError(
                f"stage {rt.name!r} read {raw.num_rows} rows but returned {out.num_rows} rows and "
                f"{rej.num_rows} rejects: every row must end in one of the two")
    except Exception as e:  # noqa: BLE001 - the shard fails, its neighbours go on
        n = raw.num_rows if raw is not None else 0
        return envelope(shard, n, n, seconds=time.perf_counter() - t0,
                        error=describe_failure(rt, shard, None, e))
    n_out = out.num_rows
    return envelope(shard, raw.num_rows, raw.num_rows,
                    output=with_rows(out, np.arange(n_out)),
                    rejects=with_rows(rej, np.arange(n_out, n_out + rej.num_rows)),
                    seconds=time.perf_counter() - t0)


# --- downstream stages ---------------------------------------------------------------------------------
def load_input(rt: StageRuntime, shard: int) -> pa.Table:
    """The stage input of a shard: previous output joined with the columns of every earlier stage."""
    names = [s for s, _ in rt.upstream]
    tables = [rt.rundir.read_table(s, fp, shard) for s, fp in rt.upstream]
    return join_upstream(names, tables)


def tag_rows(table: pa.Table, shard: int) -> pa.Table:
    n = table.num_rows
    return (table.append_column(pa.field(SHARD, pa.int32(), nullable=False), pa.array(np.full(n, shard), pa.int32()))
            .append_column(pa.field(ROW, pa.int64(), nullable=False), pa.array(np.arange(n), pa.int64()))
            .append_column(pa.field(TOTAL, pa.int64(), nullable=False), pa.array(np.full(n, n), pa.int64())))


def load_rows(batch: pa.Table, rt: StageRuntime, block_rows: int) -> Iterator[pa.Table]:
    """Ray Data generator: shard ids in, the shards' tagged input rows out in blocks of `block_rows`.

    Blocks are larger than the stage's batch size: Ray Data cuts them into batches inside each task, so
    a GPU stage with batch_size 8 does not pay one task per 8 rows."""
    for shard in batch["shard"].to_pylist():
        table = tag_rows(load_input(rt, shard), shard)
        for off in range(0, table.num_rows, block_rows):
            yield table.slice(off, block_rows)


def _allowed_extra(rt: StageRuntime, inp: pa.Table) -> tuple[str, ...] | None:
    """Extra output columns a stage may write: any (source stage), the source passthrough columns
    present in its input (final stage), or none."""
    if rt.extras == "any":
        return None
    if rt.extras == "passthrough":
        produced = {n for stage, _ in rt.upstream[1:] for n in STAGE_SCHEMAS.get(stage, pa.schema([])).names}
        return tuple(f.name for f in passthrough_fields(inp.schema) if f.name not in produced)
    return ()


def run_rows(rt: StageRuntime, stage: Stage, shard: int, group: pa.Table) -> dict:
    """Run `process_batch` on one shard's piece of a batch (tagged rows, maybe with prepare rejects)."""
    rows = group[ROW].to_numpy()
    total = int(group[TOTAL][0].as_py())
    t0 = time.perf_counter()
    pre_rejects = None
    if ERROR in group.column_names and group[ERROR].null_count < group.num_rows:
        msg = pc.drop_null(group[ERROR])[0].as_py()
        return envelope(shard, total, group.num_rows, error=msg)
    if REASON in group.column_names:
        rejected = pc.is_valid(group[REASON])
        if pc.any(rejected).as_py():
            pre = group.filter(rejected)
            pre_rejects = pa.table({
                "key": pre["key"], "stage": pa.array([rt.name] * pre.num_rows, pa.string()),
                "reason": pre[REASON], "detail": pre[DETAIL], ROW: pre[ROW],
            })
            group = group.filter(pc.invert(rejected))
            rows = group[ROW].to_numpy()
    inp = drop_internal(group)
    out_parts: list[pa.Table] = []
    rej_parts: list[pa.Table] = []
    if pre_rejects is not None:
        rej_parts.append(_reject_with_rows(rt.name, pre_rejects))
    if inp.num_rows:
        try:
            res = stage.process_batch(inp)
            out = conform_output(rt.name, res.output, rt.cls.output_schema, allowed_extra=_allowed_extra(rt, inp))
            rej = conform_rejects(rt.name, res.rejects)
            out_idx, rej_idx = account_rows(rt.name, inp["key"], out, rej)
        except Exception as e:  # noqa: BLE001 - the shard fails, its neighbours go on
            covered = group.num_rows + (pre_rejects.num_rows if pre_rejects is not None else 0)
            return envelope(shard, total, covered, seconds=time.perf_counter() - t0,
                            error=describe_failure(rt, shard, inp, e, stage))
        out_parts.append(with_rows(out, rows[out_idx]))
        rej_parts.append(with_rows(rej, rows[rej_idx]))
    covered = group.num_rows + (pre_rejects.num_rows if pre_rejects is not None else 0)
    output = pa.concat_tables(out_parts) if out_parts else None
    rejects = pa.concat_tables(rej_parts) if rej_parts else None
    return envelope(shard, total, covered, output=output, rejects=rejects, seconds=time.perf_counter() - t0)


def _reject_with_rows(stage: str, table: pa.Table) -> pa.Table:
    rows = table[ROW].to_numpy()
    return with_rows(conform_rejects(stage, table.drop_columns([ROW])), rows)


def process_rows(batch: pa.Table, rt: StageRuntime) -> pa.Table:
    """Ray Data task UDF: tagged rows in, envelopes out."""
    stage = get_stage(rt)
    return envelopes_table([run_rows(rt, stage, shard, group) for shard, group in groups_by_shard(batch)])


class ProcessActor:
    """Ray Data actor UDF: `setup()` once (spaCy pipeline, detector weights), then batches."""

    def __init__(self, rt: StageRuntime):
        self.rt = rt
        self.stage = get_stage(rt)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return envelopes_table([run_rows(self.rt, self.stage, shard, group)
                                for shard, group in groups_by_shard(batch)])


def prepare_rows(batch: pa.Table, rt: StageRuntime) -> pa.Table:
    """Ray Data task UDF ahead of the actors: `prepare_batch` (e.g. image decoding) on tagged rows.

    Prepared rows keep their tags; rows the prepare step rejects travel on with `__reason`/`__detail`
    set (and nulls elsewhere) so that the actor step reports them; a failure marks the rows `__error`."""
    stage = get_stage(rt, setup=False)  # no model loading in CPU tasks
    parts = [_prepare_group(rt, stage, shard, group) for shard, group in groups_by_shard(batch)]
    return pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]


def _prepare_group(rt: StageRuntime, stage: Stage, shard: int, group: pa.Table) -> pa.Table:
    tags = group.select([SHARD, ROW, TOTAL])
    inp = drop_internal(group)
    try:
        res = stage.prepare_batch(inp)
        rej = conform_rejects(rt.name, res.rejects)
        out_idx, rej_idx = account_rows(rt.name, inp["key"], res.output, rej)
    except Exception as e:  # noqa: BLE001 - the shard fails, its neighbours go on
        msg = describe_failure(rt, shard, inp, e, stage, prepare=True)
        return _tagged(group.select(["key"]), tags, np.arange(group.num_rows), error=msg)
    prepared = _tagged(res.output, tags, out_idx)
    if rej.num_rows == 0:
        return prepared
    rejected = _tagged(rej.select(["key"]), tags, rej_idx, reasons=rej)
    return pa.concat_tables([prepared, rejected], promote_options="permissive")


def _tagged(table: pa.Table, tags: pa.Table, idx: np.ndarray, reasons: pa.Table | None = None,
            error: str | None = None) -> pa.Table:
    t = table.drop_columns([c for c in table.column_names if c in INTERNAL])
    picked = tags.take(pa.array(idx, pa.int64()))
    for name in (SHARD, ROW, TOTAL):
        t = t.append_column(name, picked[name])
    n = t.num_rows
    t = t.append_column(REASON, reasons["reason"] if reasons is not None else pa.nulls(n, pa.string()))
    t = t.append_column(DETAIL, reasons["detail"] if reasons is not None else pa.nulls(n, pa.string()))
    return t.append_column(ERROR, pa.array([error] * n, pa.string()))


def run_shard(rt: StageRuntime, stage: Stage, shard: int) -> list[dict]:
    """A whole shard in one call (stages without a batch size): read, prepare, process."""
    if rt.is_source:
        return [run_source_shard(rt, stage, shard)]
    t0 = time.perf_counter()
    try:
        group = tag_rows(load_input(rt, shard), shard)
    except Exception as e:  # noqa: BLE001
        return [envelope(shard, 0, 0, seconds=time.perf_counter() - t0, error=describe_failure(rt, shard, None, e))]
    if group.num_rows == 0:
        return []
    if rt.has_prepare:
        group = _prepare_group(rt, stage, shard, group)
    return [run_rows(rt, stage, shard, group)]


def run_shards(batch: pa.Table, rt: StageRuntime) -> pa.Table:
    """Ray Data task UDF: shard ids in, one envelope per shard out."""
    stage = get_stage(rt)
    return envelopes_table([e for shard in batch["shard"].to_pylist() for e in run_shard(rt, stage, shard)])


class ShardActor:
    """Ray Data actor UDF for a stateful stage without a batch size: a whole shard per call."""

    def __init__(self, rt: StageRuntime):
        self.rt = rt
        self.stage = get_stage(rt)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return envelopes_table([e for shard in batch["shard"].to_pylist()
                                for e in run_shard(self.rt, self.stage, shard)])
