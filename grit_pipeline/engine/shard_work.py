"""The engine's worker side: run one stage over one shard (or one part of a shard) and write its files.

Everything here runs inside Ray tasks and actors and imports no Ray, so it is tested without a cluster.
Workers write their own outputs: a stage's output, rejects and stats for a shard go straight to the run
directory (`RunDir.write_shard_files`, atomic per file); what goes back to the driver is a `ShardReport`,
a few hundred bytes (counts, file sizes and hashes), from which the driver writes the `_done` marker.

Two ways a stage runs over a shard:

- whole-shard (`run_shard`): ingest, chunks, select, compose. The worker reads the shard's input (for
  ingest the source; otherwise the committed outputs of every earlier stage, joined by key), runs
  `process_batch` over slices of the stage's batch size, checks the stage contract, writes the files.
- in parts (`split_input` -> `prepare_part` -> `process_part` -> `write_parts`): detect. A loader task
  cuts the shard's input into parts of `part_rows` rows (a few hundred: a 10k-row shard is a few dozen
  Ray calls; a small shard into `MIN_PARTS` smaller ones); CPU tasks run `prepare_batch` (image reads and decoding) on each part; the GPU actors run
  `process_batch` over each prepared part in slices of the batch size (one forward batch each); a last
  task gathers the parts' results in row order and writes the shard. Parts travel through Ray's object
  store as Arrow tables with a `__row` column (their position in the shard's input); only references
  pass the driver.

Failures raise `ShardFailed` with a message naming the stage, shard, input file and, where one row is to
blame, its key (rows of a failed batch are retried one by one to find it).
"""

from __future__ import annotations

import resource
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from grit_pipeline.engine import stats as stats_mod
from grit_pipeline.engine.stage_io import (
    StageOutputError,
    account_rows,
    conform_output,
    conform_rejects,
    join_upstream,
    passthrough_fields,
)
from grit_pipeline.rundir.store import RunDir, json_bytes, parquet_bytes, shard_name
from schemas.tables import REJECT_SCHEMA, STAGE_SCHEMAS
from stages.base import Execution, Stage, StageConfig
from stages.retry import TransientIOError, with_retries

ROW = "__row"  # position of a row in its shard's stage input
REASON, DETAIL = "__reason", "__detail"  # set on rows the prepare step rejected
PREPARE_SECONDS = b"grit.prepare_seconds"  # schema metadata of a prepared part
CULPRIT_SEARCH_MAX_ROWS = 256  # on a failed batch, retry up to this many rows one by one to name the key
MIN_PARTS = 8  # a small shard still gets this many parts, so its first part reaches the actors soon


class ShardFailed(Exception):
    """A stage failed on a shard; the message says which stage, shard, file and (where known) key, and
    the same facts travel as fields (for `failures.jsonl`)."""

    def __init__(self, message: str, input_file: str | None = None, key: str | None = None,
                 error_type: str | None = None, traceback: str | None = None):
        super().__init__(message)
        self.input_file, self.key, self.error_type, self.traceback = input_file, key, error_type, traceback

    def __reduce__(self):  # keep the fields through pickling (Ray sends it to the driver)
        return (ShardFailed, (str(self), self.input_file, self.key, self.error_type, self.traceback))

    def details(self) -> dict[str, str | None]:
        return {"input_file": self.input_file, "key": self.key, "error_type": self.error_type,
                "traceback": self.traceback}


@dataclass(frozen=True)
class StageSpec:
    """Everything a worker needs to run one stage, the same for every shard: the scheduler puts it in
    Ray's object store once per run and passes each task a reference, so its size never grows with the
    number of shards. A source stage's task gets its own shard's description apart (`for_source`)."""

    name: str
    cls: type[Stage]
    config: StageConfig
    execution: Execution
    fingerprint: str
    rundir: RunDir
    upstream: tuple[tuple[str, str], ...] = ()  # (stage, fingerprint) of every earlier stage, in order
    extras: str = "none"  # extra output columns allowed: "any" (source stage), "passthrough" (last), "none"
    batch_rows: int | None = None  # rows per process_batch call; None = the whole shard
    allowed_images: Any = None  # the run's `stages.image_refs.ImageAllowList`, for stages that read images
    part_rows: int | None = None  # a stage run in parts: rows per part; None = batch_rows
    source: Any = None  # source stage, bound for one task (`for_source`): its SourceShard
    cap: int | None = None  # ... and that shard's row cap (run.limit); None = all rows

    @property
    def is_source(self) -> bool:
        return not self.upstream

    @property
    def rows_per_part(self) -> int | None:
        return self.part_rows or self.batch_rows

    def for_source(self, source: Any, cap: int | None) -> StageSpec:
        """This spec bound to one source shard (in the worker: the task carries only its own shard)."""
        return replace(self, source=source, cap=cap)

    def make(self, setup: bool = True) -> Stage:
        stage = self.cls(self.config, self.execution)
        if self.allowed_images is not None and hasattr(stage, "allowed_images"):
            stage.allowed_images = self.allowed_images  # type: ignore[attr-defined]
        if setup:
            stage.setup()
        return stage

    def input_desc(self, shard: int) -> str:
        if self.is_source:
            return str(getattr(self.source, "uri", self.source))
        stage, fp = self.upstream[-1]
        return self.rundir.url("stages", stage, fp, f"{shard_name(shard)}.parquet")


@dataclass(frozen=True)
class ShardReport:
    """What a worker tells the driver after writing a stage's files for a shard."""

    stage: str
    shard: int
    fingerprint: str
    rows_in: int
    rows_out: int
    rejects: dict[str, int]
    files: dict[str, dict[str, Any]]  # file name -> {size, sha256}, as the marker records them
    seconds: float
    peak_rss_mb: float
    counters: dict[str, int] = field(default_factory=dict)

    def marker(self) -> dict[str, Any]:
        """The `_done` marker: written last by the driver, it commits the shard. Only what the output
        determines (no times), so equal outputs give equal markers."""
        return {"stage": self.stage, "fingerprint": self.fingerprint, "shard": self.shard,
                "rows_in": self.rows_in, "rows": self.rows_out, "rejects": sum(self.rejects.values()),
                "reject_reasons": dict(sorted(self.rejects.items())), "files": self.files}

    def stats(self) -> dict[str, Any]:
        """What the ledger keeps of the shard's stats beyond its marker."""
        return {"counters": dict(self.counters), "seconds": round(self.seconds, 4),
                "peak_rss_mb": round(self.peak_rss_mb, 1)}


class PartResult(NamedTuple):
    """What `process_part` returns for one part of a shard (travels through the object store)."""

    output: pa.Table  # output rows + `__row`
    rejects: pa.Table  # reject rows + `__row`
    counters: dict[str, int]
    seconds: float  # prepare + process time of the part


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# --- reading a shard's input ---------------------------------------------------------------------------
def load_input(spec: StageSpec, shard: int) -> pa.Table:
    """A downstream stage's input for a shard: the previous stage's output rows, in order, joined by key
    with the columns of every earlier stage's output."""
    names = [s for s, _ in spec.upstream]
    tables = [with_retries(lambda s=s, fp=fp: spec.rundir.read_table(s, fp, shard),
                           what=f"read {spec.rundir.url('stages', s, fp, shard_name(shard) + '.parquet')}")
              for s, fp in spec.upstream]
    return join_upstream(names, tables)


def read_source(spec: StageSpec, stage: Stage, shard: int) -> pa.Table:
    src = spec.source
    if src is None:
        raise ShardFailed(f"stage {spec.name!r} shard {shard}: no source shard given to the task (internal error)")
    raw = with_retries(lambda: stage.read(src), what=f"read {getattr(src, 'uri', src)}")  # type: ignore[attr-defined]
    cap = spec.cap
    return raw.slice(0, cap) if cap is not None and raw.num_rows > cap else raw


# --- running a stage on rows ---------------------------------------------------------------------------
def _allowed_extra(spec: StageSpec, inp: pa.Table) -> tuple[str, ...] | None:
    """Extra output columns a stage may write: any (source stage), the source passthrough columns present
    in its input (last stage), or none."""
    if spec.extras == "any":
        return None
    if spec.extras == "passthrough":
        produced = {n for stage, _ in spec.upstream[1:] for n in STAGE_SCHEMAS.get(stage, pa.schema([])).names}
        return tuple(f.name for f in passthrough_fields(inp.schema) if f.name not in produced)
    return ()


def process_rows(spec: StageSpec, stage: Stage, shard: int, inp: pa.Table,
                 rows: np.ndarray) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """`process_batch` on input rows at positions `rows`: (output + `__row`, rejects + `__row`, counters).
    Checks the stage contract; raises ShardFailed naming the culprit key on any failure."""
    try:
        res = stage.process_batch(inp)
        out = conform_output(spec.name, res.output, spec.cls.output_schema,
                             allowed_extra=_allowed_extra(spec, inp))
        rej = conform_rejects(spec.name, res.rejects)
        if spec.is_source:  # the source stage may drop nothing; its rows have no prior position
            if out.num_rows + rej.num_rows != inp.num_rows:
                raise StageOutputError(
                    f"stage {spec.name!r} read {inp.num_rows} rows but returned {out.num_rows} rows and "
                    f"{rej.num_rows} rejects: every row must end in one of the two")
            out_idx, rej_idx = np.arange(out.num_rows), np.arange(out.num_rows, inp.num_rows)
        else:
            out_idx, rej_idx = account_rows(spec.name, inp["key"], out, rej)
    except Exception as e:  # noqa: BLE001 - the shard fails with a message naming the row
        raise describe_failure(spec, shard, inp, e, stage) from None
    return with_rows(out, rows[out_idx]), with_rows(rej, rows[rej_idx]), dict(res.counters)


def with_rows(table: pa.Table, rows: np.ndarray) -> pa.Table:
    return table.append_column(pa.field(ROW, pa.int64(), nullable=False), pa.array(rows, pa.int64()))


def describe_failure(spec: StageSpec, shard: int, inp: pa.Table | None, exc: BaseException,
                     stage: Stage | None = None, prepare: bool = False) -> ShardFailed:
    """The ShardFailed to raise for `exc`: stage, shard, input file, the key to blame where one row is
    (rows of a failed batch are retried one by one to find it), error type and traceback."""
    if isinstance(exc, ShardFailed):
        return exc
    where = (f"stage {spec.name!r}{' (prepare_batch)' if prepare else ''} failed on shard {shard} "
             f"({spec.input_desc(shard)})")
    what = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    fields = {"input_file": spec.input_desc(shard), "error_type": type(exc).__name__,
              "traceback": "".join(traceback.format_exception(exc))}
    if (isinstance(exc, (StageOutputError, TransientIOError)) or inp is None or "key" not in inp.column_names
            or inp.num_rows == 0):  # a transient error names its file and keys; re-running rows would only wait
        return ShardFailed(f"{where}: {what}", **fields)
    culprit = _find_culprit(stage, inp, prepare) if stage is not None else None
    if culprit is not None:
        return ShardFailed(f"{where} at key {culprit!r}: {what}", key=culprit, **fields)
    keys = inp["key"]
    return ShardFailed(f"{where} in a batch of {inp.num_rows} rows (keys {keys[0].as_py()!r}..{keys[-1].as_py()!r}): "
                       f"{what}", **fields)


def _find_culprit(stage: Stage, inp: pa.Table, prepare: bool) -> str | None:
    if inp.num_rows > CULPRIT_SEARCH_MAX_ROWS or inp.num_rows < 2:
        return inp["key"][0].as_py() if inp.num_rows == 1 else None
    fn = stage.prepare_batch if prepare else stage.process_batch
    for i in range(inp.num_rows):
        try:
            fn(inp.slice(i, 1))
        except Exception:  # noqa: BLE001 - any failure on this one row names it
            return inp["key"][i].as_py()
    return None


# --- whole-shard stages --------------------------------------------------------------------------------
def run_shard(spec: StageSpec, stage: Stage, shard: int) -> ShardReport:
    """Read a shard's input, run the stage over it (prepare included), write its files, report."""
    t0 = time.perf_counter()
    try:
        inp = read_source(spec, stage, shard) if spec.is_source else load_input(spec, shard)
    except ShardFailed:
        raise
    except Exception as e:  # noqa: BLE001
        raise describe_failure(spec, shard, None, e) from None
    n = inp.num_rows
    step = max(n if spec.is_source or not spec.batch_rows else spec.batch_rows, 1)  # the source: whole
    parts: list[tuple[pa.Table, pa.Table]] = []
    counters: dict[str, int] = {}
    prepared = stage.has_prepare()
    for start in range(0, max(n, 1), step):  # an empty input too: the stage says what its output holds
        piece = inp.slice(start, step)
        rows = np.arange(start, start + piece.num_rows)
        if prepared:
            piece = prepare_part(spec, stage, shard, with_rows(piece, rows))
            out, rej, more, _ = process_part(spec, stage, shard, piece)
        else:
            out, rej, more = process_rows(spec, stage, shard, piece, rows)
        parts.append((out, rej))
        _add(counters, more)
    return write_parts(spec, shard, n, parts, time.perf_counter() - t0, counters, schema_from=inp)


# --- stages in parts (prepare in CPU tasks, process in actors) -----------------------------------------
def part_step(spec: StageSpec, rows: int) -> int:
    """Rows per part of a shard of `rows` rows: `spec.rows_per_part`, or fewer in a small shard so that it
    still has about MIN_PARTS parts (its first part reaches the actors early, and a part's prepared data is
    small), always whole `batch_rows` batches, so a part's forward batches are the shard's."""
    most = spec.rows_per_part or max(rows, 1)
    batch = min(spec.batch_rows or most, most)
    small = -(-max(rows, 1) // MIN_PARTS)
    return min(most, -(-small // batch) * batch)


def split_input(spec: StageSpec, shard: int, parts: int) -> tuple[pa.Table, ...] | pa.Table:
    """The shard's input cut into `parts` consecutive parts of `part_step` rows (the driver knows the row
    count from the upstream marker), each with `__row`. One part is returned as itself."""
    try:
        inp = load_input(spec, shard)
    except Exception as e:  # noqa: BLE001
        raise describe_failure(spec, shard, None, e) from None
    step = part_step(spec, inp.num_rows)
    expected = -(-inp.num_rows // step)
    if expected != parts:
        raise ShardFailed(f"stage {spec.name!r} shard {shard}: input has {inp.num_rows} rows ({expected} "
                          f"parts), the upstream marker promised {parts} parts; the run directory changed "
                          "under the run")
    tagged = with_rows(inp, np.arange(inp.num_rows))
    out = tuple(tagged.slice(i * step, step) for i in range(parts))
    return out[0] if parts == 1 else out


def prepare_part(spec: StageSpec, stage: Stage, shard: int, part: pa.Table) -> pa.Table:
    """`prepare_batch` on one part (a CPU task). Prepared rows keep `__row`; rows the step rejects follow
    with `__reason`/`__detail` set (their other columns null)."""
    t0 = time.perf_counter()
    rows = part[ROW].to_numpy()
    inp = part.drop_columns([ROW])
    try:
        res = stage.prepare_batch(inp)
        rej = conform_rejects(spec.name, res.rejects)
        out_idx, rej_idx = account_rows(spec.name, inp["key"], res.output, rej)
    except Exception as e:  # noqa: BLE001
        raise describe_failure(spec, shard, inp, e, stage, prepare=True) from None
    prepared = res.output.drop_columns([c for c in (ROW, REASON, DETAIL) if c in res.output.column_names])
    n = prepared.num_rows
    prepared = (with_rows(prepared, rows[out_idx])
                .append_column(REASON, pa.nulls(n, pa.string())).append_column(DETAIL, pa.nulls(n, pa.string())))
    if rej.num_rows:
        rejected = pa.table({"key": rej["key"], ROW: pa.array(rows[rej_idx], pa.int64()),
                             REASON: rej["reason"], DETAIL: rej["detail"]})
        prepared = pa.concat_tables([prepared, rejected], promote_options="permissive")
    seconds = str(time.perf_counter() - t0).encode()
    return prepared.replace_schema_metadata({**(prepared.schema.metadata or {}), PREPARE_SECONDS: seconds})


def process_part(spec: StageSpec, stage: Stage, shard: int, part: pa.Table) -> PartResult:
    """`process_batch` on a prepared part (in an actor), over slices of `spec.batch_rows` rows (detect:
    one forward batch each), so only one slice at a time is ever copied out of the part; rows the prepare
    step rejected pass as rejects."""
    t0 = time.perf_counter()
    prepare_seconds = float((part.schema.metadata or {}).get(PREPARE_SECONDS, b"0"))
    step = max(spec.batch_rows or part.num_rows, 1)
    outs, rejs = [], []
    counters: dict[str, int] = {}
    for start in range(0, part.num_rows, step):
        out, rej, more = _process_slice(spec, stage, shard, part.slice(start, step))
        outs += [out] if out is not None else []
        rejs += rej
        _add(counters, more)
    rejects = (pa.concat_tables(rejs) if len(rejs) > 1 else rejs[0]) if rejs else with_rows(
        REJECT_SCHEMA.empty_table(), np.empty(0))
    if not outs:
        output = with_rows(spec.cls.output_schema.empty_table(), np.empty(0))
    else:
        output = pa.concat_tables(outs, promote_options="permissive") if len(outs) > 1 else outs[0]
    return PartResult(output, rejects, counters, time.perf_counter() - t0 + prepare_seconds)


def _process_slice(spec: StageSpec, stage: Stage, shard: int,
                   part: pa.Table) -> tuple[pa.Table | None, list[pa.Table], dict[str, int]]:
    """`process_batch` on one slice of a prepared part: (output + `__row` or None, rejects + `__row`, counters)."""
    rejected = pc.is_valid(part[REASON])
    if part[REASON].null_count == part.num_rows:  # nothing rejected: no copy of the prepared slice
        pre, todo = part.slice(0, 0), part
    else:
        pre, todo = part.filter(rejected), part.filter(pc.invert(rejected))
    rej_parts = []
    if pre.num_rows:
        rej_parts.append(with_rows(conform_rejects(spec.name, pa.table({
            "key": pre["key"], "stage": pa.array([spec.name] * pre.num_rows, pa.string()),
            "reason": pre[REASON], "detail": pre[DETAIL]})), pre[ROW].to_numpy()))
    if not todo.num_rows:
        return None, rej_parts, {}
    rows = todo[ROW].to_numpy()
    out, rej, counters = process_rows(spec, stage, shard, todo.drop_columns([ROW, REASON, DETAIL]), rows)
    return out, [*rej_parts, rej], counters


def write_parts(spec: StageSpec, shard: int, rows_in: int, parts: Sequence[tuple[pa.Table, pa.Table]],
                seconds: float, counters: Mapping[str, int], schema_from: pa.Table | None = None) -> ShardReport:
    """Gather a shard's parts in row order, check that every input row came back exactly once, write the
    output, rejects and stats files, and report them."""
    outputs = [o for o, _ in parts if o.num_rows]
    rejects = [r for _, r in parts if r.num_rows]
    if outputs:
        output = _in_row_order(outputs)
    elif parts:  # no rows, but the stage's own (empty) output says which columns it has
        output = parts[0][0]
    else:
        output = _empty_output(spec, schema_from)
    reject_table = _in_row_order(rejects) if rejects else REJECT_SCHEMA.empty_table()
    seen = np.zeros(rows_in, dtype=np.int64)
    for t in (*outputs, *rejects):
        np.add.at(seen, t[ROW].to_numpy(), 1)
    if rows_in and not (seen == 1).all():
        bad = int(np.argmax(seen != 1))
        raise ShardFailed(f"stage {spec.name!r} shard {shard}: input row {bad} came back {seen[bad]} times "
                          f"(expected once); {int((seen == 0).sum())} rows missing")
    output = output.drop_columns([ROW]) if ROW in output.column_names else output
    reject_table = reject_table.drop_columns([ROW]) if ROW in reject_table.column_names else reject_table
    try:
        stats = stats_mod.shard_stats(spec.name, shard, spec.fingerprint, rows_in, output, reject_table,
                                      seconds, peak_rss_mb(), counters=dict(sorted(counters.items())))
    except ValueError as e:  # stats that do not balance
        raise ShardFailed(f"stage {spec.name!r} shard {shard}: {e}") from None
    blobs = {"parquet": parquet_bytes(output), "rejects.parquet": parquet_bytes(reject_table),
             "stats.json": json_bytes(stats.to_json())}
    where = spec.rundir.url("stages", spec.name, spec.fingerprint, shard_name(shard))
    try:
        files = with_retries(lambda: spec.rundir.write_shard_files(spec.name, spec.fingerprint, shard, blobs),
                             what=f"write {where}")
    except OSError as e:  # the run directory refused a write: nothing of this shard is committed
        raise ShardFailed(f"stage {spec.name!r} shard {shard}: cannot write {where}.*: {e}",
                          input_file=spec.input_desc(shard), error_type=type(e).__name__) from None
    return ShardReport(stage=spec.name, shard=shard, fingerprint=spec.fingerprint, rows_in=rows_in,
                       rows_out=output.num_rows, rejects=stats.rejects, files=files, seconds=seconds,
                       peak_rss_mb=stats.peak_rss_mb, counters=dict(sorted(counters.items())))


def write_part_results(spec: StageSpec, shard: int, rows_in: int, results: Sequence[PartResult]) -> ShardReport:
    """The last task of a stage run in parts: `results` are the `process_part` results, in part order."""
    counters: dict[str, int] = {}
    for r in results:
        _add(counters, r.counters)
    return write_parts(spec, shard, rows_in, [(r.output, r.rejects) for r in results],
                       sum(r.seconds for r in results), counters)


def _in_row_order(parts: list[pa.Table]) -> pa.Table:
    table = pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]
    return table.take(pc.sort_indices(table[ROW])).combine_chunks()


def _empty_output(spec: StageSpec, inp: pa.Table | None) -> pa.Table:
    """The output of a shard with no output rows: the stage's schema, plus (last stage) the passthrough
    columns its input carries, so every final shard of a run has the same columns."""
    schema = spec.cls.output_schema
    if spec.extras == "passthrough" and inp is not None:
        extra = [inp.schema.field(n) for n in _allowed_extra(spec, inp) or ()]
        schema = pa.schema([*schema, *extra])
    return schema.empty_table()


def _add(into: dict[str, int], more: Mapping[str, int]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + int(v)


