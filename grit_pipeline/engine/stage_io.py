"""What a stage reads and what it may write, as plain Arrow functions the engine's workers call.

- `join_upstream`: a stage's input for a shard is the previous stage's output rows, in order, joined by
  `key` with the columns of every earlier stage's output (ingest's caption and passthrough columns, chunks'
  spans, ...).
- `conform_output` / `conform_rejects`: a stage's output holds `key` plus the columns it adds, cast to its
  `output_schema`; ingest may add source passthrough columns and compose may carry them into the GrIT
  shards, nothing else may add columns.
- `account_rows`: every input row ends in exactly one of output or rejects (`in = out + rejects`); the
  check names the first key that breaks it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.tables import INGEST_COLUMNS, REJECT_SCHEMA


class StageOutputError(ValueError):
    """A stage returned rows that break the contract (missing or extra columns, unknown or lost keys)."""


def join_upstream(names: Sequence[str], tables: Sequence[pa.Table]) -> pa.Table:
    """Rows of `tables[-1]` in its order; columns `key`, then each table's own columns in stage order."""
    last = tables[-1]
    keys = last["key"]
    fields: list[pa.Field] = [last.schema.field("key")]
    columns: list[pa.ChunkedArray] = [keys]
    seen = {"key"}
    for name, table in zip(names, tables, strict=True):
        if table is last:
            take = None
        else:
            take = pc.index_in(keys, value_set=table["key"])
            if take.null_count:
                missing = keys.filter(pc.is_null(take))[0].as_py()
                raise StageOutputError(f"key {missing!r} of stage {names[-1]!r} is missing from the output of "
                                       f"upstream stage {name!r}")
        for field in table.schema:
            if field.name == "key":
                continue
            if field.name in seen:
                raise StageOutputError(f"column {field.name!r} of stage {name!r} clashes with an upstream column")
            seen.add(field.name)
            fields.append(field)
            columns.append(table[field.name] if take is None else table[field.name].take(take))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def passthrough_fields(ingest_schema: pa.Schema) -> list[pa.Field]:
    """Source columns ingest carries along (everything after its own columns)."""
    return [f for f in ingest_schema if f.name not in INGEST_COLUMNS]


def conform_output(stage: str, table: pa.Table, schema: pa.Schema,
                   allowed_extra: Sequence[str] | None = ()) -> pa.Table:
    """`table` with the fields of `schema` (cast, in order), then allowed extra columns in their order.

    `allowed_extra=None` allows any extra column (ingest's passthrough)."""
    names = table.column_names
    missing = [f.name for f in schema if f.name not in names]
    if missing:
        raise StageOutputError(f"stage {stage!r} output lacks column(s) {missing}; it must match "
                               f"{stage}.output_schema")
    extra = [n for n in names if n not in schema.names]
    if allowed_extra is not None:
        bad = [n for n in extra if n not in set(allowed_extra)]
        if bad:
            raise StageOutputError(f"stage {stage!r} output has unexpected column(s) {bad}: a stage's output "
                                   "holds key plus the columns it adds")
    if len(set(names)) != len(names):
        raise StageOutputError(f"stage {stage!r} output has duplicate column names {names}")
    core = table.select(schema.names)
    _check_not_null(stage, core, schema)
    try:
        core = core.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, ValueError) as e:
        raise StageOutputError(f"stage {stage!r} output does not cast to its output_schema: {e}") from None
    if not extra:
        return core
    return pa.Table.from_arrays(
        [*core.columns, *(table[n] for n in extra)],
        schema=pa.schema([*schema, *(table.schema.field(n) for n in extra)]),
    )


def _check_not_null(stage: str, table: pa.Table, schema: pa.Schema) -> None:
    for field in schema:
        if not field.nullable and table[field.name].null_count:
            mask = pc.is_null(table[field.name])
            key = table["key"].filter(mask)[0].as_py() if "key" in table.column_names else None
            raise StageOutputError(f"stage {stage!r} wrote a null {field.name!r} (key {key!r}); "
                                   "the column is not nullable")


def conform_rejects(stage: str, table: pa.Table) -> pa.Table:
    try:
        rejects = table.select(REJECT_SCHEMA.names)
    except KeyError as e:
        raise StageOutputError(f"stage {stage!r} rejects do not match REJECT_SCHEMA: {e}") from None
    _check_not_null(stage, rejects, REJECT_SCHEMA)
    try:
        rejects = rejects.cast(REJECT_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as e:
        raise StageOutputError(f"stage {stage!r} rejects do not match REJECT_SCHEMA: {e}") from None
    if rejects.num_rows and not pc.all(pc.equal(rejects["stage"], stage)).as_py():
        other = pc.unique(rejects["stage"]).to_pylist()
        raise StageOutputError(f"stage {stage!r} returned rejects labelled with stage(s) {other}")
    return rejects


def account_rows(stage: str, input_keys: pa.ChunkedArray | pa.Array, output: pa.Table,
                 rejects: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Input positions of each output and each reject row; every input row must appear exactly once."""
    n = len(input_keys)
    out_pos = pc.index_in(output["key"], value_set=input_keys)
    rej_pos = pc.index_in(rejects["key"], value_set=input_keys)
    for table, pos, what in ((output, out_pos, "output"), (rejects, rej_pos, "reject")):
        if pos.null_count:
            key = table["key"].filter(pc.is_null(pos))[0].as_py()
            raise StageOutputError(f"stage {stage!r} returned {what} key {key!r} that is not in its input")
    out_idx = np.asarray(out_pos.to_numpy(zero_copy_only=False), dtype=np.int64)
    rej_idx = np.asarray(rej_pos.to_numpy(zero_copy_only=False), dtype=np.int64)
    counts = np.bincount(np.concatenate([out_idx, rej_idx]), minlength=n)
    if (counts > 1).any():
        key = input_keys[int(np.argmax(counts > 1))].as_py()
        raise StageOutputError(f"stage {stage!r} returned key {key!r} more than once (output and/or rejects)")
    if (counts == 0).any():
        lost = int((counts == 0).sum())
        key = input_keys[int(np.argmax(counts == 0))].as_py()
        raise StageOutputError(f"stage {stage!r} neither output nor rejected {lost} input row(s), first key "
                               f"{key!r}: every row must end in one of the two")
    return out_idx, rej_idx
