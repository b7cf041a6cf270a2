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

Only references inside the allowed locations are read (`shard_allow_list`, checked by the pipeline's one
check, `stages.image_refs`): the shard's own folder; for a run's final shard, what the run allowed (its
input and `ingest.external_images`, from run.yaml); and the trainer's `external_images`. `http(s)://`
URLs are never fetched (downloading is img2dataset's job, `grit download`). Such rows are reported as
unreadable, naming the reference and why. Bytes are read with the pipeline's own reader (`stages.image_reader`: one ranged
read per tar member, transient errors retried) and decoded with its checked decoder (`stages.images`:
format, size and decompression-bomb limits, EXIF orientation, odd modes to RGB), not PIL's defaults.
"""

from __future__ import annotations

import functools
import posixpath
from collections.abc import Sequence

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
import yaml

from stages.image_reader import ImageLocation, read_images
from stages.image_refs import ImageAllowList
from stages.images import DecodeLimits, ImageFailure, ResizeSpec
from stages.images import decode_image as checked_decode
from stages.ingest import allowed_images_of_run

IMAGE_COLUMNS = ("image_bytes", "image_ref", "url")
LOCATION_COLUMNS = ("image_ref", "image_offset", "image_size")  # what a run's ingest output gives a row


class ImageUnavailable(LookupError):
    """A row's pixels could not be found or decoded; the message names the shard, key and source."""


def _protocol(url: str) -> str | None:
    return url.split("://", 1)[0] if "://" in url else None


def _resolve(ref: str, shard_url: str) -> str:
    """An fsspec URL to open for `ref`. In a chained URL (`tar://m::path`) the last link is the real file;
    only it may be relative to the shard's directory. Whether it may be read is `read_images`' check."""
    links = ref.split("::")
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


@functools.lru_cache(maxsize=256)
def shard_allow_list(shard_url: str, external_images: bool | tuple[str, ...] = False) -> ImageAllowList:
    """Where the image references of a GrIT shard's rows may point: the shard's own folder; for a final
    shard of a pipeline run (`<run>/grit/shard-NNNNN.parquet`), what the run allowed (run.yaml); and
    `external_images` (the trainer's setting: false, true or prefixes). Read once per shard and process."""
    allowed = ImageAllowList.of(external_images, opt_in="the trainer's external_images").with_roots(
        posixpath.dirname(shard_url))
    grit_dir = posixpath.dirname(shard_url)
    if posixpath.basename(grit_dir) == "grit":
        fs, run = fsspec.core.url_to_fs(posixpath.dirname(grit_dir))
        try:
            with fs.open(f"{run}/run.yaml", "r") as f:
                allowed = allowed.union(allowed_images_of_run(yaml.safe_load(f) or {}))
        except (OSError, yaml.YAMLError):
            pass
    return allowed


def read_image_bytes(row: dict, shard_url: str, external_images: bool | Sequence[str] = False) -> bytes:
    """The encoded image of `row` (a dict of its columns), or ImageUnavailable; only references that
    `shard_allow_list(shard_url, external_images)` allows are read. A transient read error that outlasts
    its retries raises `stages.retry.TransientIOError` (an OSError)."""
    data = row.get("image_bytes")
    if data:
        return bytes(data)
    allowed = shard_allow_list(shard_url, external_images if isinstance(external_images, bool)
                               else tuple(external_images))
    tried = []
    for column in ("image_ref", "url"):
        ref = row.get(column)
        if not ref:
            continue
        target = _resolve(ref, shard_url)
        located = (ImageLocation(target, row.get("image_offset"), row.get("image_size"), row.get("key"))
                   if column == "image_ref" else ImageLocation(target, key=row.get("key")))
        got = read_images([located], allowed=allowed)[0]
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
