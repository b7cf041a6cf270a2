"""Reader for a local or remote folder of images with a captions file.

Layout: `<folder>/captions.jsonl` (or `captions.csv`) with at least an image column (`file`, `image`,
`file_name` or `image_path`, or `ingest.image_column`) and a caption column; images anywhere below the
folder, named by POSIX paths relative to it. The input may also be the captions file itself (its folder is
then the image root). Other columns pass through (JSONL keeps JSON types; CSV values are strings).

Keys: the `key` column when there is one, else `stable_key(<relative image path>)` -- the first 20 hex
digits of SHA-256 of the normalized relative path -- so a row keeps its key when the captions file is
reordered or `rows_per_shard` changes. Image paths that are absolute, URLs, or climb out of the folder
(`../x.jpg`) are `bad_source_row`. The folder is split into shards of `rows_per_shard` records.
"""

from __future__ import annotations

import posixpath
from collections import defaultdict

import pyarrow as pa

from stages.sources.base import (
    BAD_SOURCE_ROW,
    SourceSchemaError,
    SourceShard,
    assemble,
    basename,
    fill_missing_keys,
    join_uri,
    list_dir,
    parent_uri,
    split_shards,
    stable_key,
    url_to_fs,
)
from stages.sources.config import IngestConfig
from stages.sources.records import count_records, read_records, records_to_table

CAPTION_FILES = ("captions.jsonl", "captions.csv")
IMAGE_ALIASES = ("file", "image", "file_name", "image_path")


def looks_like(entries: dict[str, str]) -> bool:
    return any(entries.get(name) == "file" for name in CAPTION_FILES)


def captions_file(uri: str) -> tuple[str, str]:
    """(captions file URI, image root URI) for a folder or a captions-file input."""
    fs, path = url_to_fs(uri)
    if fs.isfile(path):
        return uri, parent_uri(uri)
    entries = list_dir(uri)
    for name in CAPTION_FILES:
        if entries.get(name) == "file":
            return join_uri(uri, name), uri
    raise SourceSchemaError(f"{uri}: no {' or '.join(CAPTION_FILES)} in this folder")


def discover(uri: str, cfg: IngestConfig) -> list[SourceShard]:
    captions, root = captions_file(uri)
    return split_shards(captions, count_records(captions), cfg.rows_per_shard, "folder", images_uri=root)


def relative_image_path(value: str) -> str | None:
    """The normalized POSIX path of an image inside the folder, or None when it points outside."""
    value = value.strip()
    if not value or "://" in value or value.startswith("/"):
        return None
    norm = posixpath.normpath(value)
    if norm == "." or norm == ".." or norm.startswith("../"):
        return None
    return norm


def read(shard: SourceShard, cfg: IngestConfig) -> pa.Table:
    records = read_records(shard.uri, shard.row_start or 0, shard.row_end)
    parsed = records_to_table(records, cfg, shard.uri, image_aliases=IMAGE_ALIASES, image_required=True)
    table, cols, reject, detail = parsed.table, parsed.columns, parsed.reject, parsed.detail
    root = shard.images_uri or parent_uri(shard.uri)

    paths: list[str | None] = [None] * table.num_rows
    images = table[cols.image].to_pylist() if cols.image else [None] * table.num_rows
    for i, value in enumerate(images):
        if reject[i] is not None:
            continue
        paths[i] = relative_image_path(value) if value is not None else None
        if value is None:
            reject[i], detail[i] = BAD_SOURCE_ROW, f"line {parsed.lines[i]}: no image path"
        elif paths[i] is None:
            reject[i], detail[i] = BAD_SOURCE_ROW, f"line {parsed.lines[i]}: image path {value!r} is not inside the folder"

    if cols.key:
        raw_keys = table[cols.key].to_pylist()
    else:
        raw_keys = [stable_key(p) if p is not None else None for p in paths]
    keys = fill_missing_keys(raw_keys, shard.uri, parsed.lines, "line", reject, detail)

    present = _present_files(root, [p for p in paths if p is not None])
    refs = [join_uri(root, p) if p is not None and p in present else None for p in paths]
    missing = [f"{p} not found in {basename(root)}/" if p is not None and p not in present else None
               for p in paths]
    return assemble(table, cols, source=shard.uri, shard=shard.index, key=keys,
                    image_ref=pa.array(refs, pa.string()), reject=reject, detail=detail,
                    image_missing=missing)


def _present_files(root: str, paths: list[str]) -> set[str]:
    """The subset of relative `paths` that exist as files, with one listing per distinct folder."""
    by_dir: dict[str, list[str]] = defaultdict(list)
    for p in paths:
        by_dir[posixpath.dirname(p)].append(p)
    present: set[str] = set()
    for folder in sorted(by_dir):
        files = {name for name, kind in list_dir(join_uri(root, folder) if folder else root).items()
                 if kind == "file"}
        present.update(p for p in by_dir[folder] if posixpath.basename(p) in files)
    return present
