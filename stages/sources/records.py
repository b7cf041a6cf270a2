"""Row-by-row reading of text sources (JSON Lines, CSV) for the `folder` and `grit20m` readers.

Text sources are parsed one record at a time so that one malformed line becomes one `bad_source_row`
reject instead of failing the whole file. A record is a non-blank JSONL line or a CSV data row; records
are numbered from 0 in file order, which is what `SourceShard.row_start/row_end` slice. Reading a slice
scans the file from its start (lines before the slice are skipped unparsed), so text sources suit the
folder-sized inputs they are meant for; big sources come as Parquet.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from stages.sources.base import BAD_SOURCE_ROW, Columns, SourceSchemaError, resolve_columns, url_to_fs
from stages.sources.config import IngestConfig


@dataclass
class Record:
    line: int  # 1-based line number where the record starts
    values: dict[str, Any] | None  # None when the record could not be parsed
    error: str | None = None


def text_kind(uri: str) -> str:
    lower = uri.lower()
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if lower.endswith(".csv"):
        return "csv"
    raise SourceSchemaError(f"{uri}: not a .jsonl or .csv file")


def count_records(uri: str) -> int:
    return sum(1 for _ in _iter_raw(uri, 0, None, parse=False))


def read_records(uri: str, start: int = 0, end: int | None = None) -> list[Record]:
    """Records `start` (inclusive) to `end` (exclusive) of a JSONL or CSV file."""
    return list(_iter_raw(uri, start, end, parse=True))


def _iter_raw(uri: str, start: int, end: int | None, parse: bool) -> Iterator[Record]:
    kind = text_kind(uri)
    fs, path = url_to_fs(uri)
    if kind == "jsonl":
        yield from _iter_jsonl(fs, path, start, end, parse)
    else:
        try:
            yield from _iter_csv(fs, path, uri, start, end)
        except UnicodeDecodeError as exc:
            raise SourceSchemaError(f"{uri}: not UTF-8 text ({exc})") from exc


def _iter_jsonl(fs, path: str, start: int, end: int | None, parse: bool) -> Iterator[Record]:
    index = -1
    with fs.open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            index += 1
            if index < start:
                continue
            if end is not None and index >= end:
                return
            if not parse:
                yield Record(line_no, None)
                continue
            try:
                text = raw.decode("utf-8")
                obj = json.loads(text.lstrip("\ufeff") if line_no == 1 else text)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                yield Record(line_no, None, f"line {line_no}: not valid JSON ({exc})")
                continue
            if not isinstance(obj, dict):
                yield Record(line_no, None, f"line {line_no}: a JSON {type(obj).__name__}, not an object")
                continue
            if _SURROGATE_ESCAPE.search(text) and not _encodable(obj):
                yield Record(line_no, None, f"line {line_no}: holds an unpaired UTF-16 surrogate escape")
                continue
            yield Record(line_no, obj)


# JSON may escape UTF-16 surrogates (`\ud83d\ude00`); paired ones decode to one character, but a lone one
# yields a Python string that is not valid Unicode and cannot go into Arrow.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _encodable(obj: Any) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _iter_csv(fs, path: str, uri: str, start: int, end: int | None) -> Iterator[Record]:
    with fs.open(path, "rt", encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        if len(set(header)) != len(header):
            raise SourceSchemaError(f"{uri}: repeated column names in the CSV header {header}")
        index = -1
        line_no = reader.line_num + 1
        for row in reader:
            row_line, line_no = line_no, reader.line_num + 1
            if not row:
                continue  # blank line
            index += 1
            if index < start:
                continue
            if end is not None and index >= end:
                return
            if len(row) != len(header):
                yield Record(row_line, None, f"line {row_line}: {len(row)} fields, header has {len(header)}")
                continue
            # CSV has no null: an empty field is a missing value
            yield Record(row_line, {name: (value if value != "" else None) for name, value in zip(header, row, strict=True)})


def column_names(records: list[Record]) -> list[str]:
    """Union of the records' field names, in first-seen order."""
    seen: dict[str, None] = {}
    for rec in records:
        if rec.values is not None:
            for name in rec.values:
                seen.setdefault(name, None)
    return list(seen)


def column_array(values: list[Any]) -> pa.Array:
    """One column of parsed records as Arrow, with the type Arrow infers from the JSON values. A column
    whose values have incompatible types (a number in one row, an object in another) becomes JSON text."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError):
        return pa.array([None if v is None else json.dumps(v, sort_keys=True, ensure_ascii=False)
                         for v in values], pa.string())


_ROLE_TYPES = {"key": (str, int), "caption": (str,), "url": (str,), "image": (str,)}


@dataclass
class RecordTable:
    """Parsed records as a source table, plus what went wrong with each record (None = nothing)."""

    table: pa.Table
    columns: Columns
    lines: list[int]
    reject: list[str | None]
    detail: list[str | None]


def records_to_table(records: list[Record], cfg: IngestConfig, source: str, *,
                     image_aliases: tuple[str, ...] = (), image_required: bool = False) -> RecordTable:
    """Turn parsed records into a table. Unparseable records and records whose caption/key/url/image field
    has the wrong JSON type are flagged `bad_source_row` (their fields nulled); the rest are untouched."""
    names = column_names(records)
    if not names:  # nothing parsed: every record is a bad_source_row, no columns to resolve
        names = [cfg.caption_column or "caption"]
        cols = Columns(caption=names[0], key=None, url=None, width=None, height=None)
    else:
        cols = resolve_columns(names, cfg, source, image_aliases=image_aliases, image_required=image_required)
    roles = {"key": cols.key, "caption": cols.caption, "url": cols.url, "image": cols.image}
    reject: list[str | None] = [None] * len(records)
    detail: list[str | None] = [None] * len(records)
    rows: list[dict[str, Any]] = []
    for i, rec in enumerate(records):
        if rec.values is None:
            reject[i], detail[i] = BAD_SOURCE_ROW, rec.error
            rows.append({})
            continue
        values = dict(rec.values)
        for role, name in roles.items():
            value = values.get(name) if name else None
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, _ROLE_TYPES[role]):
                if reject[i] is None:
                    reject[i] = BAD_SOURCE_ROW
                    detail[i] = f"line {rec.line}: {role} field {name!r} is a JSON {type(value).__name__}"
                values[name] = None
            elif role == "key":
                values[name] = str(value)
        rows.append(values)
    string_roles = {n for n in roles.values() if n}
    arrays = {name: (pa.array([r.get(name) for r in rows], pa.string()) if name in string_roles
                     else column_array([r.get(name) for r in rows]))
              for name in names}
    table = pa.table(arrays)
    return RecordTable(table, cols, [r.line for r in records], reject, detail)
