"""Source readers of the ingest stage, one module per source format.

Each module exposes `discover(uri, cfg) -> list[SourceShard]` and `read(shard, cfg) -> pa.Table` (the raw
ingest table described in `stages.sources.base`); `stages.ingest.IngestStage` dispatches on the format and
validates what they read. All I/O goes through fsspec, so `s3://`, `gs://` and `memory://` work like
local paths.
"""

from __future__ import annotations

from types import ModuleType

from stages.sources import folder, grit20m, img2dataset, parquet
from stages.sources.base import SourceSchemaError, SourceShard, list_dir, url_to_fs
from stages.sources.records import read_records

READERS: dict[str, ModuleType] = {
    "img2dataset": img2dataset,
    "folder": folder,
    "parquet": parquet,
    "grit20m": grit20m,
}

__all__ = ["READERS", "SourceSchemaError", "SourceShard", "detect_format"]


def detect_format(uri: str) -> str:
    """Tell the source format of `uri` for `ingest.format: auto`:

    - a folder with `NNNNN.parquet` next to `NNNNN.tar`, `NNNNN/` or `NNNNN_stats.json` -> img2dataset;
    - a folder with `captions.jsonl`/`captions.csv`, or a `.csv` file -> folder;
    - Parquet (a file, or the first file of a folder) or a JSONL file whose first record has GRIT's
      `noun_chunks`/`ref_exps` -> grit20m; other Parquet -> parquet; other JSONL -> folder.
    """
    fs, path = url_to_fs(uri)
    if fs.isfile(path):
        lower = path.lower()
        if lower.endswith(".parquet"):
            return _parquet_kind(uri)
        if grit20m.is_text(uri):
            first = next((r.values for r in read_records(uri, 0, 1) if r.values is not None), {})
            return "grit20m" if any(c in first for c in grit20m.MARKER_COLUMNS) else "folder"
        if lower.endswith(".csv"):
            return "folder"
        raise SourceSchemaError(f"{uri}: cannot tell the source format of this file; set ingest.format")
    if not fs.isdir(path):
        raise FileNotFoundError(f"{uri}: no such file or folder")
    entries = list_dir(uri)
    if img2dataset.looks_like(entries):
        return "img2dataset"
    if folder.looks_like(entries):
        return "folder"
    files = parquet.parquet_files(uri)
    if files:
        return _parquet_kind(files[0])
    raise SourceSchemaError(
        f"{uri}: cannot tell the source format (no img2dataset shards, captions.jsonl/.csv or .parquet "
        "files); set ingest.format")


def _parquet_kind(uri: str) -> str:
    names = parquet.file_schema(uri).names
    return "grit20m" if any(c in names for c in grit20m.MARKER_COLUMNS) else "parquet"
