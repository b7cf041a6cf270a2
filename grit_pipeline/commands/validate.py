"""`grit validate`: check every final GrIT shard of a run against the GRIT schema and its invariants.

Per shard: the columns start with `schemas.tables.GRIT_FIELDS` (names and types; non-nullable columns
hold no nulls), keys are unique within it. Across the run: no key is in two shards, found by a k-way merge
of the shards' sorted 64-bit key hashes (the publisher's `publish/shard-N.keys` files where they match the
shard) and confirmed with the real keys, so a hash collision is never reported as a duplicate. Memory is
bounded whatever the run's size: a few shards at a time plus the merge's buffers (`validate_run`). Per row (`schemas.rows.GritRow`): every
`[start, end, x1, y1, x2, y2, score]` entry has a non-empty span inside the caption and a box and score
that pass `schemas.boxes.check_boxes` (0 <= x1 < x2 <= 1, 0 <= y1 < y2 <= 1 within its float-noise
tolerance, a score in [0, 1]; checked for a whole table in one call, and rows with a failing entry are then
validated entry by entry for the message); `noun_chunks` and `ref_exps` align 1:1 and each referring
expression contains its chunk. Both grounded views parse back (`schemas.grounded_text`) to exactly the
caption, and each tagged span with its location tokens is a span of `ref_exps` (or of `noun_chunks`)
with exactly the boxes those entries give under the run's location encoder.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from pydantic import ValidationError

from grit_pipeline.engine.key_index import kway_merge
from grit_pipeline.engine.publish import key_hashes
from grit_pipeline.errors import BadInput, reading
from schemas.boxes import check_boxes
from schemas.display import display_text
from schemas.grounded_text import parse_grounded_caption, parse_markdown_caption
from schemas.location import encode_box
from schemas.rows import BOXES_CHECKED, GritRow
from schemas.tables import GRIT_FIELDS

MAX_PROBLEMS_PER_FILE = 50
WORKERS = 4  # final shards read and checked at once
MERGE_FAN_IN = 64  # sorted key-hash files merged at once
MERGE_CHUNK = 1 << 14  # hashes read from each of them at a time
MAX_SHARED_HASHES = 100_000  # key hashes held in more than one shard that are kept for confirming


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
    files: list[str] = field(default_factory=list)  # every shard checked, an unreadable one included
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
    """Problems of one final shard: schema, every row, keys repeated within it (or, given `seen_keys`,
    repeated from the files recorded there; `validate_run` checks across files by merging key hashes)."""
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
    with fs.open(path, "rb") as f, reading(path, "run.yaml", yaml.YAMLError):
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise BadInput(f"{path}: not a run.yaml (a YAML mapping of settings); found a {type(cfg).__name__}")
    return (cfg.get("compose") or {}).get("location_encoder") or "unilm"


@dataclass
class _Checked:
    """One final shard after its check: its problems and where its sorted key hashes are."""

    name: str
    rows: int = 0
    problems: list[Problem] = field(default_factory=list)
    keys: str | None = None  # a sorted uint64 key-hash file: the publisher's, or one spilled here
    keys_remote: bool = False  # `keys` is in the run directory (the publisher's), not local
    readable: bool = True


def _check_file(fs: fsspec.AbstractFileSystem, path: str, name: str, encoder: str, keys_path: str | None,
                spill: str) -> _Checked:
    """Read and check one final shard; leave its sorted key hashes in a file for the cross-shard merge."""
    try:
        table = pq.read_table(path, filesystem=fs)
    except (OSError, pa.ArrowInvalid) as e:
        return _Checked(name, problems=[Problem(name, None, f"unreadable Parquet: {e}")], readable=False)
    out = _Checked(name, rows=table.num_rows, problems=validate_table(table, name, encoder))
    if "key" not in table.column_names or not pa.types.is_string(table.schema.field("key").type):
        return out
    hashes = np.sort(key_hashes(table["key"].to_pylist()))
    del table
    if keys_path is not None:
        try:
            published = np.frombuffer(fs.cat_file(keys_path), dtype="<u8")
        except FileNotFoundError:
            published = None
        if published is not None and np.array_equal(published, hashes):
            out.keys, out.keys_remote = keys_path, True
            return out
        if published is not None:
            out.problems.append(Problem(name, None, f"its keys differ from the publisher's key file "
                                                    f"{fs.unstrip_protocol(keys_path)} (changed after publishing?)"))
    hashes.astype("<u8").tofile(spill)
    out.keys = spill
    return out


def _key_chunks(fs: fsspec.AbstractFileSystem, checked: _Checked, index: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A shard's sorted key hashes in pieces of MERGE_CHUNK, each with the shard's index in the run."""
    assert checked.keys is not None
    opener = fs.open(checked.keys, "rb") if checked.keys_remote else open(checked.keys, "rb")
    with opener as f:
        while True:
            data = f.read(MERGE_CHUNK * 8)
            if not data:
                return
            h = np.frombuffer(data, dtype="<u8").astype(np.uint64)
            yield h, np.full(len(h), index, np.int64)


def _pair_chunks(path: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A merged run written by `_spill_merge`: (hash uint64, shard index int64) pairs."""
    pairs = np.dtype([("h", "<u8"), ("s", "<i8")])
    with open(path, "rb") as f:
        while True:
            data = f.read(MERGE_CHUNK * pairs.itemsize)
            if not data:
                return
            rec = np.frombuffer(data, dtype=pairs)
            yield rec["h"].astype(np.uint64), rec["s"].astype(np.int64)


def _spill_merge(sources: list[Iterator[tuple[np.ndarray, np.ndarray]]], path: str) -> str:
    pairs = np.dtype([("h", "<u8"), ("s", "<i8")])
    with open(path, "wb") as f:
        for h, s in kway_merge(sources):
            rec = np.empty(len(h), dtype=pairs)
            rec["h"], rec["s"] = h, s
            rec.tofile(f)
            del rec
    return path


def _shared_hashes(sources: list[Iterator[tuple[np.ndarray, np.ndarray]]], tmp: str) -> dict[int, set[int]]:
    """Key hashes found in two or more shards -> those shards' indexes, by a k-way merge of the sorted
    hash streams: at most MERGE_FAN_IN streams at once, merged in levels through temporary files when there
    are more. At most MAX_SHARED_HASHES hashes are kept."""
    level = 0
    while len(sources) > MERGE_FAN_IN:
        groups = [sources[i:i + MERGE_FAN_IN] for i in range(0, len(sources), MERGE_FAN_IN)]
        sources = [_pair_chunks(_spill_merge(g, os.path.join(tmp, f"merge-{level}-{n}.bin")))
                   for n, g in enumerate(groups)]
        level += 1
    shared: dict[int, set[int]] = {}
    prev_h: np.ndarray = np.empty(0, np.uint64)
    prev_s: np.ndarray = np.empty(0, np.int64)
    for h, s in kway_merge(sources):
        hh, ss = np.concatenate([prev_h, h]), np.concatenate([prev_s, s])
        same = np.flatnonzero((hh[1:] == hh[:-1]) & (ss[1:] != ss[:-1]))
        for i in same:
            if len(shared) >= MAX_SHARED_HASHES and int(hh[i]) not in shared:
                break
            shared.setdefault(int(hh[i]), set()).update((int(ss[i]), int(ss[i + 1])))
        prev_h, prev_s = hh[-1:], ss[-1:]
    return shared


def _cross_shard_duplicates(fs: fsspec.AbstractFileSystem, paths: list[str], names: list[str],
                            shared: dict[int, set[int]]) -> list[Problem]:
    """Confirm shared hashes with the real keys (a hash collision is not a duplicate): read the key column
    of each shard involved, one at a time."""
    by_shard: dict[int, set[int]] = {}
    for h, shards in shared.items():
        for s in shards:
            by_shard.setdefault(s, set()).add(h)
    holders: dict[str, int] = {}  # key -> lowest shard index holding it, for the shared hashes only
    problems: list[Problem] = []
    per_file: dict[int, int] = {}
    for s in sorted(by_shard):
        keys = pq.read_table(paths[s], columns=["key"], filesystem=fs)["key"].to_pylist()
        wanted = by_shard[s]
        for key, h in zip(keys, key_hashes(keys).tolist(), strict=True):
            if h not in wanted:
                continue
            first = holders.setdefault(key, s)
            if first != s:
                per_file[s] = per_file.get(s, 0) + 1
                if per_file[s] <= MAX_PROBLEMS_PER_FILE:
                    problems.append(Problem(names[s], key, f"duplicate key (also in {names[first]})"))
    for s, n in sorted(per_file.items()):
        if n > MAX_PROBLEMS_PER_FILE:
            problems.append(Problem(names[s], None, f"{n} duplicate keys in all; the first "
                                                    f"{MAX_PROBLEMS_PER_FILE} are listed"))
    if len(shared) >= MAX_SHARED_HASHES:
        problems.append(Problem(names[min(by_shard)], None, f"more than {MAX_SHARED_HASHES:,} key hashes are "
                                                            "shared between shards; only those were checked"))
    return problems


def validate_run(uri: str, storage_options: Mapping[str, Any] | None = None,
                 encoder: str | None = None, workers: int = WORKERS) -> ValidationReport:
    """Validate `<run>/grit/shard-*.parquet` (or a single Parquet file / folder of them).

    Memory stays bounded whatever the number of shards: `workers` shards are read and checked at once
    (each held as its Arrow table, and its rows as Python objects while they are checked), then only
    their sorted key hashes are kept, in files: the publisher's `publish/shard-N.keys` when they match the
    shard, else spilled to a temporary folder (8 bytes per key). Keys repeated across shards are found by a
    k-way merge of those files (MERGE_FAN_IN files at once, MERGE_CHUNK hashes of each: about 100 MB;
    more files are merged in levels through temporary files of 16 bytes per key) and each shared hash is
    confirmed with the real keys of the shards holding it."""
    fs, root = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
    root = root.rstrip("/")
    publish_dir: str | None = None
    if fs.isfile(root):
        files, enc_root = [root], posixpath.dirname(root)
    else:
        in_run = fs.isdir(posixpath.join(root, "grit"))
        folder = posixpath.join(root, "grit") if in_run else root
        files = sorted(p for p in fs.ls(folder, detail=False) if posixpath.basename(p).startswith("shard-")
                       and p.endswith(".parquet"))
        enc_root = root
        publish_dir = posixpath.join(root, "publish") if in_run else None
    encoder = encoder or run_encoder(fs, enc_root)
    names = [fs.unstrip_protocol(p) if "://" in uri else p for p in files]
    report = ValidationReport()
    with tempfile.TemporaryDirectory(prefix="grit-validate-") as tmp, \
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        def submit(i: int) -> Future[_Checked]:
            keys = (posixpath.join(publish_dir, posixpath.basename(files[i])[: -len(".parquet")] + ".keys")
                    if publish_dir else None)
            return pool.submit(_check_file, fs, files[i], names[i], encoder, keys, os.path.join(tmp, f"{i}.keys"))

        window: deque[Future[_Checked]] = deque(submit(i) for i in range(min(len(files), max(1, workers))))
        checked: list[_Checked] = []
        while window:
            done = window.popleft().result()
            if len(checked) + len(window) + 1 < len(files):
                window.append(submit(len(checked) + len(window) + 1))
            checked.append(done)
            report.problems.extend(done.problems)
            report.files.append(done.name)  # checked, readable or not
            report.rows += done.rows
        with_keys = [i for i, c in enumerate(checked) if c.keys is not None]
        shared = _shared_hashes([_key_chunks(fs, checked[i], i) for i in with_keys], tmp)
        if shared:
            report.problems.extend(_cross_shard_duplicates(fs, files, names, shared))
    return report
