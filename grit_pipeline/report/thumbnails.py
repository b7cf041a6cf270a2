"""Image pixels for the report and `grit inspect`: a row's image read with the detect stage's own reader
(`stages.image_reader`: fsspec URLs incl. `tar://member::tar`, one ranged read per image from the
`image_offset`/`image_size` ingest recorded; only where the run's allow-list allows, never http(s):
`stages.image_refs`) and decoded with its checked decoder (`stages.images`: size
and bomb limits, EXIF orientation, odd modes to RGB), then made into an embeddable JPEG thumbnail. Only the
shown images are read.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from stages.image_reader import ImageLocation, read_images
from stages.image_refs import ImageAllowList
from stages.images import DecodedImage, ImageFailure, ResizeSpec, decode_image
from stages.retry import TransientIOError


class ImageUnavailable(RuntimeError):
    """A row's image could not be read or decoded; the message names the ref and the reason."""


@dataclass(frozen=True)
class Thumbnail:
    data_uri: str
    width: int
    height: int


def load_images(locations: Sequence[ImageLocation | None], allowed: ImageAllowList,
                longest_side: int | None = None) -> list[Image.Image | ImageUnavailable]:
    """RGB images at `locations` (`ImageLocation.from_row` of the rows shown), scaled so the longest side
    is `longest_side` (None: original size); a failure for one image is returned in its place, never
    raised (a transient read error that outlasts its retries fails every image of the call). Only
    references `allowed` allows are read (the run's `RunFiles.allowed_images`); never http(s)."""
    resize = ResizeSpec(size=longest_side, max_size=None, mode="longer") if longest_side else None
    try:
        blobs: list[bytes | ImageFailure] = read_images(list(locations), allowed=allowed)
    except TransientIOError as e:
        return [ImageUnavailable(f"image_unreadable: {e}") for _ in locations]
    out: list[Image.Image | ImageUnavailable] = []
    for loc, data in zip(locations, blobs, strict=True):
        decoded: DecodedImage | ImageFailure = data if isinstance(data, ImageFailure) else decode_image(data, resize)
        if isinstance(decoded, ImageFailure):
            reason = getattr(decoded.reason, "value", decoded.reason)
            out.append(ImageUnavailable(f"{reason}: {decoded.detail or (loc.ref if loc else '')}"))
        else:
            out.append(Image.fromarray(decoded.pixels, "RGB"))
    return out


def open_image(location: ImageLocation | None, allowed: ImageAllowList) -> Image.Image:
    """One row's image at its original size (boxes are normalized to it); raises ImageUnavailable."""
    img = load_images([location], allowed)[0]
    if isinstance(img, ImageUnavailable):
        raise img
    return img


def thumbnail(img: Image.Image, quality: int = 82) -> Thumbnail:
    """`img` as a JPEG `data:` URI."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=True)
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return Thumbnail(uri, img.width, img.height)
