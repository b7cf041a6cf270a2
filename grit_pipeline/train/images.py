"""Where a GrIT row's pixels come from, and decoding them to the model's input size.

GrIT shards carry no image bytes of their own (the pipeline never copies them). A row's image is looked
up, in this order:

1. an `image_bytes` passthrough column (what `grit synth --embed-images` writes);
2. an `image_ref` column (an fsspec URL of the bytes, with `image_offset`/`image_size` for a tar
   member). When the shard has none and is a final shard of a pipeline run
   (`<run>/grit/shard-NNNNN.parquet`), they come from that run's ingest output for the same shard
   (`<run>/stages/ingest/<fingerprint in run.yaml>/shard-NNNNN.parquet`, joined on `key`): that is how
   the trainer reads `make demo` / `grit run` output, whose `url` is the web address and whose images
   sit in the source's webdataset tars;
3. the `url` column, when it is something fsspec reads without the web: a local path, `file://`, a
   chained `tar://<member>::<tar path>` URL into a webdataset shard, `s3://`, `gs://`, `memory://`...
   A relative path is resolved against the directory of the shard holding the row.

`http(s)://` URLs are not fetched (downloading is img2dataset's job, `grit download`); such rows are
reported as unreadable. Bytes are read with the pipeline's own reader (`stages.image_reader`: one ranged
read per tar member, transient errors retried) and decoded with its checked decoder (`stages.images`:
format, size and decompression-bomb limits, EXIF orientation, odd modes to RGB), not PIL's defaults.
"""

from __future__ import annotations

import posixpath

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
import yaml

from stages.image_reader import ImageLocation, read_images
from stages.images import DecodeLimits, ImageFailure, ResizeSpec
from stages.images import decode_image as checked_decode

WEB_PROTOCOLS = ("http", "https", "ftp")
IMAGE_COLUMNS = ("image_bytes", "image_ref", "url")
LOCATION_COLUMNS = ("image_ref", "image_offset", "image_size")  # what a run's ingest output gives a row


class ImageUnavailable(LookupError):
    """A row's pixels could not be found or decoded; the message names the shard, key and source."""


def _protocol(url: str) -> str | None:
    return url.split("://", 1)[0] if "://" in url else None


def _resolve(ref: str, shard_url: str) -> str | None:
    """An fsspec URL to open for `ref`, or None for a web URL. In a chained URL (`tar://m::path`) the
    last link is the real file; only it may be relative to the shard's directory."""
    links = ref.split("::")
    if any(_protocol(link) in WEB_PROTOCOLS for link in links):
        return None
    last = links[-1]
    if _protocol(last) is None and not posixpath.isabs(last):
        links[-1] = posixpath.join(posixpath.dirname(shard_url), last)
    return "::".join(links)


def run_image_refs(shard_url: str) -> dict[str, dict]:
    """key -> {image_ref, image_offset, image_size} from the ingest output of the pipeline run holding
    `shard_url`, when it is a `<run>/grit/shard-NNNNN.parquet` whose run kept that output; {} otherwise."""
    grit_dir = posixpath.dirname(shard_url)
    if posixpath.basename(grit_dir) != "grit":
        return {}
    name = posixpath.basename(shard_url)
    fs, run = fsspec.core.url_to_fs(posixpath.dirname(grit_dir))
    candidates = []
    try:
        with fs.open(f"{run}/run.yaml", "r") as f:
            fp = ((yaml.safe_load(f) or {}).get("fingerprints") or {}).get("ingest")
        if fp:
            candidates.append(f"{run}/stages/ingest/{fp}/{name}")
    except (OSError, yaml.YAMLError):
        pass
    candidates += sorted(fs.glob(f"{run}/stages/ingest/*/{name}"))
    for path in candidates:
        if fs.exists(path):
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                if "image_ref" not in pf.schema_arrow.names:
                    continue
                table = pf.read(columns=["key", *(c for c in LOCATION_COLUMNS if c in pf.schema_arrow.names)])
            return {row.pop("key"): row for row in table.to_pylist() if row.get("image_ref")}
    return {}


def read_image_bytes(row: dict, shard_url: str) -> bytes:
    """The encoded image of `row` (a dict of its columns), or ImageUnavailable. A transient read error
    that outlasts its retries raises `stages.retry.TransientIOError` (an OSError)."""
    data = row.get("image_bytes")
    if data:
        return bytes(data)
    tried = []
    for column in ("image_ref", "url"):
        ref = row.get(column)
        if not ref:
            continue
        target = _resolve(ref, shard_url)
        if target is None:
            tried.append(f"{column}={ref!r} (web URLs are not fetched)")
            continue
        located = (ImageLocation(target, row.get("image_offset"), row.get("image_size"), row.get("key"))
                   if column == "image_ref" else ImageLocation(target, key=row.get("key")))
        got = read_images([located])[0]
        if not isinstance(got, ImageFailure):
            return got
        tried.append(f"{column}={target!r} ({got.reason.value}: {got.detail})")
    raise ImageUnavailable(f"{shard_url}: key {row.get('key')!r}: no readable image: "
                           + ("; ".join(tried) or f"none of the columns {IMAGE_COLUMNS} is set"))


def decode_image(data: bytes, size: int, limits: DecodeLimits = DecodeLimits()) -> torch.Tensor:
    """Encoded bytes -> float tensor [3, size, size] in [-1, 1], with the pipeline's checks (`limits`:
    decompression bombs, tiny images; corrupt data) raising ImageUnavailable. The image is EXIF-oriented
    like the boxes were, and resized without keeping its aspect ratio, so normalized boxes stay valid (as
    Kosmos-2's preprocessing does)."""
    decoded = checked_decode(data, ResizeSpec(size=size, max_size=None, mode="square"), limits)
    if isinstance(decoded, ImageFailure):
        raise ImageUnavailable(f"{decoded.reason.value}: {decoded.detail}")
    arr = decoded.pixels.astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
