"""`grit validate`: check every final GrIT shard of a run against the GRIT schema and its invariants.

Per shard: the columns start with `schemas.tables.GRIT_FIELDS` (names and types; non-nullable columns
hold no nulls), keys are unique across the run. Per row (`schemas.rows.GritRow`): every
`[start, end, x1, y1, x2, y2, score]` entry has a non-empty span inside the caption and a box and score
that pass `schemas.boxes.check_boxes` (0 <= x1 < x2 <= 1, 0 <= y1 < y2 <= 1 within its float-noise
tolerance, a score in [0, 1]; checked for a whole table in one call, and rows with a failing entry are then
validated entry by entry for the message); `noun_chunks` and `ref_exps` align 1:1 and each referring
expression contains its chunk. Both grounded views parse back (`schemas.grounded_text`) to exactly the
caption, and each tagged span with its location tokens is a span of `ref_exps` (or of `noun_chunks`)
with exactly the boxes those entries give under the run's location encoder.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from pydantic import ValidationError

from schemas.boxes import check_boxes
from schemas.display import display_text
from schemas.grounded_text import parse_grounded_caption, parse_markdown_caption
from schemas.location import encode_box
from schemas.rows import BOXES_CHECKED, GritRow
from schemas.tables import GRIT_FIELDS

MAX_PROBLEMS_PER_FILE = 50


@dataclass(frozen=True)
class Problem:
    file: str
    key: str | None
    message: str

    def __str__(self) -> str:
        """One line safe to print: the file, key and message are shown through `display_text`."""
        where = f"{self.file}" + (f" key {self.key!r}" if self.key is not None else "")
        return display_text(f"{where}: {self.message}")


@dataclass
class ValidationReport:
    files: list[str] = field(default_factory=list)
    rows: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.files) and not self.problems


def check_schema(schema: pa.Schema, table: pa.Table | None = None, file: str = "") -> list[Problem]:
    problems = []
    for i, expected in enumerate(GRIT_FIELDS):
        if i >= len(schema) or schema.field(i).name != expected.name:
            got = schema.field(i).name if i < len(schema) else "nothing"
            problems.append(Problem(file, None, f"column {i} should be {expected.name!r}, found {got!r} "
                                                "(GRIT columns first, passthrough after)"))
            return problems
        if not schema.field(i).type.equals(expected.type):
            problems.append(Problem(file, None, f"column {expected.name!r} has type {schema.field(i).type}, "
                                                f"expected {expected.type}"))
        elif table is not None and not expected.nullable and table[expected.name].null_count:
            problems.append(Problem(file, None, f"column {expected.name!r} holds "
                                                f"{table[expected.name].null_count} null(s)"))
    return problems


def _boxes(entries: Iterable[Any], span: tuple[int, int], encoder: str) -> set[tuple[int, int]]:
    # corners were checked: one outside [0, 1] by at most BOX_TOLERANCE is encoded as clipped, as compose does
    return {encode_box([min(max(float(c), 0.0), 1.0) for c in e[2:6]], encoder)
            for e in entries if (int(e[0]), int(e[1])) == span}


def check_row(row: Mapping[str, Any], encoder: str = "unilm", boxes_checked: bool = False) -> list[str]:
    """What is wrong with one GrIT row (empty list when nothing). `boxes_checked`: every box and score of
    the row has passed `check_boxes` already (`_rows_with_bad_boxes`), so the row model skips that check."""
    try:
        GritRow.model_validate(dict(row), context={BOXES_CHECKED: boxes_checked})
    except ValidationError as e:
        return [f"{'.'.join(str(p) for p in err['loc']) or 'row'}: {err['msg']}" for err in e.errors()]
    errors = []
    caption = row["caption"]
    views = {}
    for name, parse in (("grounded_caption", parse_grounded_caption), ("markdown_caption", parse_markdown_caption)):
        try:
            views[name] = parse(row[name])
        except ValueError as e:
            errors.append(f"{name} does not parse: {e}")
            continue
        if views[name].caption != caption:
            errors.append(f"{name} parses to caption {views[name].caption!r}, not {caption!r}")
    if len(views) == 2 and views["grounded_caption"].spans != views["markdown_caption"].spans:
        errors.append("grounded_caption and markdown_caption tag different spans or boxes")
    parsed = views.get("grounded_caption") or views.get("markdown_caption")
    if parsed is None:
        return errors
    if not parsed.spans:
        errors.append("grounded_caption tags no span")
    for span in parsed.spans:
        key = (span.start, span.end)
        expected = _boxes(row["ref_exps"], key, encoder) or _boxes(row["noun_chunks"], key, encoder)
        if not expected:
            errors.append(f"tagged span [{span.start}, {span.end}) {caption[span.start:span.end]!r} is not a "
                          "span of ref_exps or noun_chunks")
        elif set(span.boxes) != expected:
            errors.append(f"tagged span [{span.start}, {span.end}) has boxes {sorted(span.boxes)}, its entries "
                          f"encode ({encoder}) to {sorted(expected)}")
        elif not span.boxes:
            errors.append(f"tagged span [{span.start}, {span.end}) has no box")
    return errors


def _rows_with_bad_boxes(table: pa.Table) -> np.ndarray:
    """(rows,) bool: the row has a `noun_chunks`/`ref_exps` entry that is null, not 7 values long, or whose
    box and score fail `check_boxes` (a null value counts as NaN) -- one check over the whole table."""
    bad_rows = np.zeros(table.num_rows, dtype=bool)
    for name in ("noun_chunks", "ref_exps"):
        lists = table[name].combine_chunks()
        entries = lists.flatten()  # one list<double> per entry; null lists have none
        row = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
        whole = pc.fill_null(pc.equal(pc.list_value_length(entries), 7), False).to_numpy(zero_copy_only=False)
        values = pc.fill_null(entries.filter(pa.array(whole)).flatten(), np.nan).to_numpy(zero_copy_only=False)
        values = values.reshape(-1, 7)
        bad = ~whole
        bad[whole] = ~check_boxes(values[:, 2:6], values[:, 6]).ok
        bad_rows[row[bad]] = True
    return bad_rows


def validate_table(table: pa.Table, file: str = "", encoder: str = "unilm",
                   seen_keys: dict[str, str] | None = None) -> list[Problem]:
    problems = check_schema(table.schema, table, file)
    if problems:
        return problems
    seen = seen_keys if seen_keys is not None else {}
    columns = [f.name for f in GRIT_FIELDS]
    bad_boxes = _rows_with_bad_boxes(table)
    for i, row in enumerate(table.select(columns).to_pylist()):
        key = row["key"]
        if key in seen:
            problems.append(Problem(file, key, f"duplicate key (also in {seen[key]})"))
        seen[key] = file
        problems.extend(Problem(file, key, msg) for msg in check_row(row, encoder, not bad_boxes[i]))
        if len(problems) >= MAX_PROBLEMS_PER_FILE:
            problems.append(Problem(file, None, f"stopped after {MAX_PROBLEMS_PER_FILE} problems"))
            break
    return problems


def run_encoder(fs: fsspec.AbstractFileSystem, root: str) -> str:
    """The location encoder compose used in this run (run.yaml), `unilm` when not recorded."""
    path = posixpath.join(root, "run.yaml")
    if not fs.exists(path):
        return "unilm"
    with fs.open(path, "rb") as f:
        cfg = yaml.safe_load(f) or {}
    return (cfg.get("compose") or {}).get("location_encoder") or "unilm"


def validate_run(uri: str, storage_options: Mapping[str, Any] | None = None,
                 encoder: str | None = None) -> ValidationReport:
    """Validate `<run>/grit/shard-*.parquet` (or a single Parquet file / folder of them)."""
    fs, root = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
    root = root.rstrip("/")
    if fs.isfile(root):
        files, enc_root = [root], posixpath.dirname(root)
    else:
        folder = posixpath.join(root, "grit") if fs.isdir(posixpath.join(root, "grit")) else root
        files = sorted(p for p in fs.ls(folder, detail=False) if posixpath.basename(p).startswith("shard-")
                       and p.endswith(".parquet"))
        enc_root = root
    encoder = encoder or run_encoder(fs, enc_root)
    report = ValidationReport()
    seen: dict[str, str] = {}
    for path in files:
        name = fs.unstrip_protocol(path) if "://" in uri else path
        try:
            table = pq.read_table(path, filesystem=fs)
        except (OSError, pa.ArrowInvalid) as e:
            report.problems.append(Problem(name, None, f"unreadable Parquet: {e}"))
            continue
        report.files.append(name)
        report.rows += table.num_rows
        report.problems.extend(validate_table(table, name, encoder, seen))
    return report
