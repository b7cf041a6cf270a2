"""Image pixels for the report and `grit inspect`: a row's `image_ref` read and decoded with the detect
stage's own reader (`stages.images`: fsspec URLs incl. `tar://member::tar`, EXIF orientation, odd modes to
RGB), then made into an embeddable JPEG thumbnail. Only the shown images are read.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from stages.images import DecodedImage, ImageFailure, ResizeSpec, decode_image, read_image_refs


class ImageUnavailable(RuntimeError):
    """A row's image could not be read or decoded; the message names the ref and the reason."""


@dataclass(frozen=True)
class Thumbnail:
    data_uri: str
    width: int
    height: int


def load_images(refs: Sequence[str | None], longest_side: int | None = None) -> list[Image.Image | ImageUnavailable]:
    """RGB images for `refs` (each tar opened once), scaled so the longest side is `longest_side`
    (None: original size); a failure for one ref is returned in its place, never raised."""
    resize = ResizeSpec(size=longest_side, max_size=None, mode="longer") if longest_side else None
    out: list[Image.Image | ImageUnavailable] = []
    for ref, data in zip(refs, read_image_refs(list(refs)), strict=True):
        decoded: DecodedImage | ImageFailure = data if isinstance(data, ImageFailure) else decode_image(data, resize)
        if isinstance(decoded, ImageFailure):
            reason = getattr(decoded.reason, "value", decoded.reason)
            out.append(ImageUnavailable(f"{reason}: {decoded.detail or ref}"))
        else:
            out.append(Image.fromarray(decoded.pixels, "RGB"))
    return out


def open_image(image_ref: str | None) -> Image.Image:
    """One row's image at its original size (boxes are normalized to it); raises ImageUnavailable."""
    img = load_images([image_ref])[0]
    if isinstance(img, ImageUnavailable):
        raise img
    return img


def thumbnail(img: Image.Image, quality: int = 82) -> Thumbnail:
    """`img` as a JPEG `data:` URI."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=True)
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return Thumbnail(uri, img.width, img.height)
