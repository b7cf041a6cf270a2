"""Reader for a local or remote folder of images with a captions file.

Layout: `<folder>/captions.jsonl` (or `captions.csv`) with at least an image column (`file`, `image`,
`file_name` or `image_path`, or `ingest.image_column`) and a caption column; images anywhere below the
folder, named by POSIX paths relative to it. The input may also be the captions file itself (its folder is
then the image root). Other columns pass through (JSONL keeps JSON types; CSV values are strings).

Keys: the `key` column when there is one, else `stable_key(<relative image path>)` -- the first 20 hex
digits of SHA-256 of the normalized relative path -- so a row keeps its key when the captions file is
reordered or `rows_per_shard` changes. Image paths that climb out of the folder (`../x.jpg`), or are
absolute paths or URLs outside `ingest.external_images`, are `image_not_allowed`; http(s) ones
`image_web_url` (`stages.image_refs`). The folder is split into shards of `rows_per_shard` records.
"""

from __future__ import annotations

import pyarrow as pa

from stages.sources.base import (
    BAD_SOURCE_ROW,
    SourceSchemaError,
    SourceShard,
    assemble,
    basename,
    existing_files,
    fill_missing_keys,
    flag_refused,
    join_uri,
    list_dir,
    parent_uri,
    resolve_image_paths,
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


def read(shard: SourceShard, cfg: IngestConfig) -> pa.Table:
    records = read_records(shard.uri, shard.row_start or 0, shard.row_end)
    parsed = records_to_table(records, cfg, shard.uri, image_aliases=IMAGE_ALIASES, image_required=True)
    table, cols, reject, detail = parsed.table, parsed.columns, parsed.reject, parsed.detail
    root = shard.images_uri or parent_uri(shard.uri)

    images = table[cols.image].to_pylist() if cols.image else [None] * table.num_rows
    values = [v if reject[i] is None else None for i, v in enumerate(images)]
    refs, refused = resolve_image_paths(values, root, cfg.allowed_images(root))
    flag_refused(refused, reject, detail, lambda i: f"line {parsed.lines[i]}: ")
    for i, value in enumerate(values):
        if reject[i] is None and (value is None or not value.strip()):
            reject[i], detail[i] = BAD_SOURCE_ROW, f"line {parsed.lines[i]}: no image path"

    if cols.key:
        raw_keys = table[cols.key].to_pylist()
    else:  # of the path relative to the folder, or of the whole reference outside it
        raw_keys = [None if r is None else stable_key(_shown_path(r, root)) for r in refs]
    keys = fill_missing_keys(raw_keys, shard.uri, parsed.lines, "line", reject, detail)

    present = existing_files(r for r in refs if r is not None)
    missing = [f"{_shown_path(r, root)} not found in {basename(root)}/" if r is not None and r not in present
               else None for r in refs]
    return assemble(table, cols, source=shard.uri, shard=shard.index, key=keys,
                    image_ref=pa.array([r if r in present else None for r in refs], pa.string()),
                    reject=reject, detail=detail, image_missing=missing)


def _shown_path(ref: str, root: str) -> str:
    """`ref` relative to the folder `root` when it is inside it, else as it is."""
    inside = root.rstrip("/") + "/"
    return ref[len(inside):] if ref.startswith(inside) else ref
