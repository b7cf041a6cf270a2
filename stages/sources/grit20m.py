"""Reader for GRIT-20M metadata: re-processing the released corpus without its images.

Input: the released Parquet files (a file or a folder of them, split like `parquet` sources), or JSON
Lines in the same shape (`key, url, caption, width, height, noun_chunks, ref_exps, id,
clip_similarity_vitb32, clip_similarity_vitl14`, as in `tests/data/grit_published_samples.jsonl`).
There are no images: `image_ref` is null and `ingest.require_image` defaults to false. GRIT's own
`noun_chunks`/`ref_exps` clash with columns this pipeline produces and pass through as
`src_noun_chunks`/`src_ref_exps` (the replay detector reads them); every other column passes through.
A row without a key is `bad_source_row`.
"""

from __future__ import annotations

import pyarrow as pa

from stages.sources.base import (
    SourceShard,
    as_string_column,
    assemble,
    fill_missing_keys,
    resolve_columns,
    split_shards,
    url_to_fs,
)
from stages.sources.config import IngestConfig
from stages.sources.parquet import discover_files, read_slice
from stages.sources.records import count_records, read_records, records_to_table

# Columns that only GRIT metadata carries: how `auto` tells it from plain image-caption Parquet.
MARKER_COLUMNS = ("noun_chunks", "ref_exps")


def is_text(uri: str) -> bool:
    return uri.lower().endswith((".jsonl", ".json", ".ndjson"))


def discover(uri: str, cfg: IngestConfig) -> list[SourceShard]:
    fs, path = url_to_fs(uri)
    if fs.isfile(path) and is_text(uri):
        return split_shards(uri, count_records(uri), cfg.rows_per_shard, "grit20m")
    return discover_files(uri, cfg, "grit20m")


def read(shard: SourceShard, cfg: IngestConfig) -> pa.Table:
    if is_text(shard.uri):
        parsed = records_to_table(read_records(shard.uri, shard.row_start or 0, shard.row_end), cfg, shard.uri)
        table, cols, reject, detail, positions, where = (parsed.table, parsed.columns, parsed.reject,
                                                         parsed.detail, parsed.lines, "line")
    else:
        table = read_slice(shard)
        cols = resolve_columns(table.column_names, cfg, shard.uri)
        reject = [None] * table.num_rows
        detail = [None] * table.num_rows
        positions = list(range(shard.row_start or 0, (shard.row_start or 0) + table.num_rows))
        where = "row"
    raw_keys = (as_string_column(table[cols.key], "key", shard.uri).to_pylist() if cols.key
                else [None] * table.num_rows)
    keys = fill_missing_keys(raw_keys, shard.uri, positions, where, reject, detail)
    return assemble(table, cols, source=shard.uri, shard=shard.index, key=keys, reject=reject, detail=detail)
