"""`grit export`: GrIT shards -> (image, text) rows for fine-tuning Hugging Face's Kosmos-2.

`text` is the row's `grounded_caption` exactly as `Kosmos2Processor` tokenizes it: `<grounding>` then the
caption with `<phrase>...</phrase><object><patch_index_a><patch_index_b></object>` tags (the processor
adds the `<image>...</image>` part itself, so pass `text=row["text"]` and no `bboxes`). Two layouts:

- `imagefolder` (default): `<out>/images/<name>.<ext>` with the original image bytes and
  `<out>/metadata.jsonl` lines `{"file_name": "images/...", "text": ..., "key": ...}` -- what
  `datasets.load_dataset("imagefolder", data_dir=out)` reads;
- `parquet`: `<out>/data-NNNNN.parquet` with columns `key`, `image` (bytes) and `text`, one file per shard.

Rows whose image cannot be found, or lies outside the allowed locations (`shard_allow_list`; never http),
are left out and counted (the summary names the first few keys).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from typing import get_args

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pydantic import TypeAdapter

from grit_pipeline.train.choices import ExportFormat
from grit_pipeline.train.dataset import iter_rows, list_shards
from grit_pipeline.train.images import ImageUnavailable, read_image_bytes
from stages.image_refs import ExternalImages

EXPORT_COLUMNS = ("key", "grounded_caption", "url", "image_ref", "image_bytes")
PARQUET_SCHEMA = pa.schema([("key", pa.string()), ("image", pa.binary()), ("text", pa.string())])
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


def kosmos2_text(grounded_caption: str) -> str:
    """The string to hand `Kosmos2Processor(text=...)`: the processor strips its input, so do we."""
    return grounded_caption.strip()


def _file_name(key: str, data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as im:
            ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}.get(im.format or "", "img")
    except OSError:
        ext = "img"
    stem = key if _SAFE_NAME.match(key) else hashlib.sha1(key.encode()).hexdigest()
    return f"images/{stem}.{ext}"


def export_kosmos2(shards: str | list[str], out: str, fmt: ExportFormat = "imagefolder",
                   max_rows: int | None = None, external_images: bool | list[str] = False) -> dict:
    """Write the export; returns {"rows", "missing_images", "missing_keys" (first 10), "files"}. Images are
    read only where `grit_pipeline.train.images.shard_allow_list` allows (the shard's folder, the run's
    input, `external_images`: false, true or prefixes), never over http(s)."""
    if fmt not in get_args(ExportFormat):
        raise ValueError(f"format must be one of {', '.join(get_args(ExportFormat))}, not {fmt!r}")
    external_images = TypeAdapter(ExternalImages).validate_python(external_images)
    shard_list = list_shards(shards)  # before anything is written
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(f"{root}/images" if fmt == "imagefolder" else root, exist_ok=True)
    written, missing, missing_keys, files = 0, 0, [], []
    meta = fs.open(f"{root}/metadata.jsonl", "w") if fmt == "imagefolder" else None
    try:
        for i, shard in enumerate(shard_list):
            keys, images, texts = [], [], []
            for row in iter_rows(shard, EXPORT_COLUMNS):
                if max_rows is not None and written >= max_rows:
                    break
                if not row.get("grounded_caption"):
                    continue
                try:
                    data = read_image_bytes(row, shard, external_images)
                except ImageUnavailable:
                    missing += 1
                    if len(missing_keys) < 10:
                        missing_keys.append(row["key"])
                    continue
                text = kosmos2_text(row["grounded_caption"])
                if meta is not None:
                    name = _file_name(row["key"], data)
                    with fs.open(f"{root}/{name}", "wb") as f:
                        f.write(data)
                    meta.write(json.dumps({"file_name": name, "text": text, "key": row["key"]},
                                          ensure_ascii=False) + "\n")
                else:
                    keys.append(row["key"])
                    images.append(data)
                    texts.append(text)
                written += 1
            if meta is None and keys:
                path = f"{root}/data-{i:05d}.parquet"
                with fs.open(path, "wb") as f:
                    pq.write_table(pa.table([keys, images, texts], schema=PARQUET_SCHEMA), f)
                files.append(fs.unstrip_protocol(path))
    finally:
        if meta is not None:
            meta.close()
            files.append(fs.unstrip_protocol(f"{root}/metadata.jsonl"))
    return {"rows": written, "missing_images": missing, "missing_keys": missing_keys, "files": files}
