"""Reader for image-caption metadata in Parquet (LAION, COYO, or any table with a url and a caption).

Input: one `.parquet` file or a folder of them (searched recursively; names starting with `.` or `_`
skipped), in sorted path order. Each file is split into shards of `rows_per_shard` rows; shards never span
files, so the last shard of each file may be shorter. Only the row groups covering a shard are read.

Columns: caption (`caption`/`TEXT`/`text`), url (`url`/`URL`), optional key (`key`), optional image
column (`image_path`, or `ingest.image_column`): a path relative to the Parquet file's folder, or an
absolute path/URL, read only inside the folder or a prefix of `ingest.external_images` and never over
http(s) (`stages.image_refs`; others are rejected `image_not_allowed`/`image_web_url`). Without a key column, key = `stable_key(url or image path, caption)` as written in the
source, so exact (url, caption) repeats inside a shard are reported as `duplicate_key`. Every other column
passes through with its Parquet type.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from stages.sources.base import (
    SourceSchemaError,
    SourceShard,
    as_string_column,
    assemble,
    basename,
    existing_files,
    fill_missing_keys,
    flag_refused,
    join_uri,
    parent_uri,
    resolve_columns,
    resolve_image_paths,
    split_shards,
    stable_key,
    url_to_fs,
)
from stages.sources.config import IngestConfig

IMAGE_ALIASES = ("image_path",)


def parquet_files(uri: str) -> list[str]:
    """The Parquet file URIs of a file or folder input, sorted by path."""
    fs, path = url_to_fs(uri)
    if fs.isfile(path):
        return [uri]
    root = path.rstrip("/")
    found = []
    for p in fs.find(path):
        rel = p[len(root):].lstrip("/") if p.startswith(root) else basename(p)
        if rel.endswith(".parquet") and not any(part.startswith((".", "_")) for part in rel.split("/")):
            found.append(rel)
    return [join_uri(uri, rel) for rel in sorted(found)]


def file_schema(uri: str) -> pa.Schema:
    fs, path = url_to_fs(uri)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).schema_arrow


def discover_files(uri: str, cfg: IngestConfig, fmt: str) -> list[SourceShard]:
    files = parquet_files(uri)
    if not files:
        raise SourceSchemaError(f"{uri}: no .parquet files found")
    shards: list[SourceShard] = []
    for file_uri in files:
        fs, path = url_to_fs(file_uri)
        with fs.open(path, "rb") as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        shards += split_shards(file_uri, rows, cfg.rows_per_shard, fmt, first_index=len(shards))
    return shards


def read_slice(shard: SourceShard) -> pa.Table:
    """Rows [row_start, row_end) of the shard's file, reading only the row groups that hold them."""
    fs, path = url_to_fs(shard.uri)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        if shard.row_start is None or shard.row_end is None:
            return pf.read()
        groups, first_row, offset = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            rows = pf.metadata.row_group(g).num_rows
            if offset < shard.row_end and offset + rows > shard.row_start:
                groups.append(g)
                first_row = offset if first_row is None else first_row
            offset += rows
        if not groups:
            return pf.schema_arrow.empty_table()
        table = pf.read_row_groups(groups)
    return table.slice(shard.row_start - first_row, shard.row_end - shard.row_start)


def discover(uri: str, cfg: IngestConfig) -> list[SourceShard]:
    return discover_files(uri, cfg, "parquet")


def read(shard: SourceShard, cfg: IngestConfig) -> pa.Table:
    table = read_slice(shard)
    require_image = cfg.requires_image("parquet")
    cols = resolve_columns(table.column_names, cfg, shard.uri, image_aliases=IMAGE_ALIASES)
    if require_image and cols.image is None:
        raise SourceSchemaError(
            f"{shard.uri}: no image column (looked for {', '.join(IMAGE_ALIASES)}; set ingest.image_column). "
            "Metadata without images needs ingest.require_image=false.")
    n = table.num_rows
    reject: list[str | None] = [None] * n
    detail: list[str | None] = [None] * n
    urls = as_string_column(table[cols.url], "url", shard.uri).to_pylist() if cols.url else [None] * n
    images = as_string_column(table[cols.image], "image", shard.uri).to_pylist() if cols.image else [None] * n
    if cols.key:
        raw_keys = as_string_column(table[cols.key], "key", shard.uri).to_pylist()
    else:
        captions = as_string_column(table[cols.caption], "caption", shard.uri).to_pylist()
        raw_keys = [stable_key(u or i or "", c or "") for u, i, c in zip(urls, images, captions, strict=True)]
    positions = list(range(shard.row_start or 0, (shard.row_start or 0) + n))
    keys = fill_missing_keys(raw_keys, shard.uri, positions, "row", reject, detail)

    refs: list[str | None] = [None] * n
    missing: list[str | None] = [None] * n
    if cols.image:
        base = parent_uri(shard.uri)
        wanted, refused = resolve_image_paths(images, base, cfg.allowed_images(base))
        flag_refused(refused, reject, detail)
        present = existing_files(u for u in wanted if u is not None)
        for i, want in enumerate(wanted):
            if want is not None and want in present:
                refs[i] = want
            elif refused[i] is None:
                missing[i] = f"image {images[i]!r} not found" if want is not None else "no image path"
    return assemble(table, cols, source=shard.uri, shard=shard.index, key=keys,
                    image_ref=pa.array(refs, pa.string()), reject=reject, detail=detail,
                    image_missing=missing)
