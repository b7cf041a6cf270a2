"""Reader for img2dataset output folders (what `grit download` writes).

Layout, as img2dataset 1.47 writes it: per shard `NNNNN.parquet` (metadata: key, url, caption, status,
error_message, width, height, original_width, original_height, exif, sha256, plus any
`save_additional_columns`), `NNNNN_stats.json`, and the images either in `NNNNN.tar` (webdataset:
members `<key>.jpg`, `<key>.txt`, `<key>.json`) or in a folder `NNNNN/` (files format, same names).
One source shard per img2dataset shard; its index is the number in the file name.

`width`/`height` are those of the stored image (what `image_ref` points at; img2dataset's own columns);
the original size passes through as `original_width`/`original_height`. `status`/`error_message` are
consumed: rows with `status != "success"` become `download_failed` rejects (detail = error_message).
For a tar, `image_offset`/`image_size` say where the member's data sits in it (read from the same one
listing of the tar), so detect fetches each image with one ranged read. The shard's tar or folder, and
each file of a folder, must stay inside the input folder (or `ingest.external_images`) once symlinks are
resolved (`stages.image_refs`); otherwise its rows are rejected `image_not_allowed` and it is not read.
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq

from stages.image_refs import check_ref, check_refs
from stages.sources.base import (
    DOWNLOAD_FAILED,
    SourceSchemaError,
    SourceShard,
    as_string_column,
    assemble,
    basename,
    fill_missing_keys,
    flag_refused,
    image_index,
    join_uri,
    list_dir,
    list_tar_files,
    parent_uri,
    resolve_columns,
    url_to_fs,
)
from stages.sources.config import IngestConfig
from stages.tar_index import TarMember

SHARD_FILE = re.compile(r"^(\d+)\.parquet$")
STATUS_COLUMNS = ("status", "error_message")


def looks_like(entries: dict[str, str]) -> bool:
    """A folder listing that holds at least one img2dataset shard (metadata plus images or stats)."""
    for name in entries:
        m = SHARD_FILE.match(name)
        if m and (f"{m[1]}.tar" in entries or entries.get(m[1]) == "directory" or f"{m[1]}_stats.json" in entries):
            return True
    return False


def discover(uri: str, cfg: IngestConfig) -> list[SourceShard]:
    entries = list_dir(uri)
    shards: dict[int, SourceShard] = {}
    for name in sorted(entries):
        m = SHARD_FILE.match(name)
        if not m or entries[name] != "file":
            continue
        number = m[1]
        if f"{number}.tar" in entries:
            images = join_uri(uri, f"{number}.tar")
        elif entries.get(number) == "directory":
            images = join_uri(uri, number)
        else:
            images = None  # a shard whose images never got written: its rows become missing_image
        index = int(number)
        if index in shards:
            raise SourceSchemaError(f"{uri}: two metadata files for shard {index} "
                                    f"({basename(shards[index].uri)}, {name})")
        shards[index] = SourceShard(index=index, uri=join_uri(uri, name), format="img2dataset",
                                    images_uri=images)
    if not shards:
        raise SourceSchemaError(f"{uri}: no img2dataset shards (NNNNN.parquet) found")
    return [shards[i] for i in sorted(shards)]


def read(shard: SourceShard, cfg: IngestConfig) -> pa.Table:
    fs, path = url_to_fs(shard.uri)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    cols = resolve_columns(table.column_names, cfg, shard.uri)
    n = table.num_rows
    reject: list[str | None] = [None] * n
    detail: list[str | None] = [None] * n
    raw_keys = as_string_column(table[cols.key], "key", shard.uri).to_pylist() if cols.key else [None] * n
    keys = fill_missing_keys(raw_keys, shard.uri, list(range(n)), "row", reject, detail)

    status = table["status"].to_pylist() if "status" in table.column_names else ["success"] * n
    errors = table["error_message"].to_pylist() if "error_message" in table.column_names else [None] * n
    for i in range(n):
        if reject[i] is None and status[i] != "success":
            reject[i] = DOWNLOAD_FAILED
            detail[i] = errors[i] or f"img2dataset status {status[i]!r}"

    allowed = cfg.allowed_images(parent_uri(shard.uri))
    refused_all = check_ref(shard.images_uri, allowed)  # a tar or folder linked from elsewhere: not listed
    found, members, where = _image_index(shard) if refused_all is None else ({}, {}, "")
    refs: list[str | None] = [None] * n
    offsets: list[int | None] = [None] * n
    sizes: list[int | None] = [None] * n
    missing: list[str | None] = [None] * n
    for i, key in enumerate(raw_keys):
        name = found.get(key) if key is not None else None
        if refused_all is not None:
            continue
        if name is None:
            missing[i] = f"no image for key {key!r} in {where}"
        elif name in members:
            refs[i] = f"tar://{name}::{shard.images_uri}"
            offsets[i], sizes[i] = members[name].offset, members[name].size
        else:
            refs[i] = join_uri(shard.images_uri or "", name)
    refused = [refused_all] * n if refused_all is not None else check_refs(refs, allowed)
    flag_refused(refused, reject, detail)
    refs = [None if r is not None else ref for ref, r in zip(refs, refused, strict=True)]
    return assemble(table, cols, source=shard.uri, shard=shard.index, key=keys,
                    image_ref=pa.array(refs, pa.string()), image_offset=pa.array(offsets, pa.int64()),
                    image_size=pa.array(sizes, pa.int64()), reject=reject, detail=detail,
                    image_missing=missing, consumed=STATUS_COLUMNS)


def _image_index(shard: SourceShard) -> tuple[dict[str, str], dict[str, TarMember], str]:
    """Key -> image file name of the shard, the tar members by name (empty for a folder) and what was
    listed, from one listing of its tar or folder."""
    if shard.images_uri is None:
        return {}, {}, f"{basename(shard.uri)} (no matching .tar or folder)"
    if shard.images_uri.endswith(".tar"):
        members = {m.name: m for m in list_tar_files(shard.images_uri)}
        return image_index(members), members, basename(shard.images_uri)
    entries = list_dir(shard.images_uri)
    return image_index(n for n, t in entries.items() if t == "file"), {}, basename(shard.images_uri) + "/"
