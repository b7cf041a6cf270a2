"""Where a GrIT row's pixels come from, and decoding them to the model's input size.

GrIT shards carry no image bytes of their own (the pipeline never copies them). A row's image is looked
up, in this order:

1. an `image_bytes` passthrough column (what `grit synth --embed-images` writes);
2. an `image_ref` column (an fsspec URL of the bytes). When the shard has none and is a final shard of a
   pipeline run (`<run>/grit/shard-NNNNN.parquet`), it comes from that run's ingest output for the same
   shard (`<run>/stages/ingest/<fingerprint in run.yaml>/shard-NNNNN.parquet`, joined on `key`): that is
   how the trainer reads `make demo` / `grit run` output, whose `url` is the web address and whose
   images sit in the source's webdataset tars;
3. the `url` column, when it is something fsspec reads without the web: a local path, `file://`, a
   chained `tar://<member>::<tar path>` URL into a webdataset shard, `s3://`, `gs://`, `memory://`...
   A relative path is resolved against the directory of the shard holding the row.

`http(s)://` URLs are not fetched (downloading is img2dataset's job, `grit download`); such rows are
reported as unreadable.
"""

from __future__ import annotations

import io
import posixpath

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
import yaml
from PIL import Image

WEB_PROTOCOLS = ("http", "https", "ftp")
IMAGE_COLUMNS = ("image_bytes", "image_ref", "url")


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


def run_image_refs(shard_url: str) -> dict[str, str]:
    """key -> image_ref from the ingest output of the pipeline run holding `shard_url`, when it is a
    `<run>/grit/shard-NNNNN.parquet` whose run kept that output; {} otherwise."""
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
                table = pf.read(columns=["key", "image_ref"])
            return {k: r for k, r in zip(table["key"].to_pylist(), table["image_ref"].to_pylist(), strict=True) if r}
    return {}


def read_image_bytes(row: dict, shard_url: str) -> bytes:
    """The encoded image of `row` (a dict of its columns), or ImageUnavailable."""
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
        try:
            with fsspec.open(target, "rb") as f:
                return f.read()
        except (OSError, ValueError, KeyError) as e:
            tried.append(f"{column}={target!r} ({type(e).__name__}: {e})")
    raise ImageUnavailable(f"{shard_url}: key {row.get('key')!r}: no readable image: "
                           + ("; ".join(tried) or f"none of the columns {IMAGE_COLUMNS} is set"))


def decode_image(data: bytes, size: int) -> torch.Tensor:
    """Encoded bytes -> float tensor [3, size, size] in [-1, 1]. The image is resized without keeping its
    aspect ratio, so normalized boxes stay valid (as Kosmos-2's preprocessing does)."""
    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB").resize((size, size), Image.BILINEAR)
    arr = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
