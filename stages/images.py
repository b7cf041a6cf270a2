"""Decoding images with checks: the one checked decoder of the pipeline (the CPU half of `detect`, the
replay backend's image check, the trainer's image loader, the report's thumbnails).

The engine runs detect's decoding in Ray tasks ahead of the GPU actors (`DetectStage.prepare_batch`), so
JPEG decoding never stalls the GPU. The bytes come from `stages.image_reader`. Per image:

1. check the header before decoding anything: more than `max_pixels` pixels -> `image_too_large`
   (decompression bombs), a side under `min_side` -> `image_too_small`;
2. decode, with JPEG draft mode (DCT scaling) straight to about the target size;
3. apply the EXIF orientation; bring palette/alpha/LA/CMYK/16-bit/float modes to 8-bit RGB
   (transparent pixels are composited on white);
4. resize to the target size (`ResizeSpec`).

Every failure is a `ImageFailure(reason, detail)` for that image alone: truncated or garbage bytes are
`image_decode_error` (a missing file or tar member, `image_unreadable`, comes from the reader).
`check_image` runs steps 1-2 only, at the smallest draft scale: what the replay backend, which needs no
pixels, uses to reject the same images with the same reasons as a pixel detector.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from schemas.rows import RejectReason

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default bomb limit (~ 0.25 GiB of RGBA)
DEFAULT_MIN_SIDE = 10
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class ImageFailure:
    """Why one image could not be used; becomes a reject row of the detect stage."""

    reason: RejectReason
    detail: str


@dataclass(frozen=True)
class DecodedImage:
    """8-bit RGB pixels at the detector's input size, and the size of the original (EXIF-oriented) image."""

    pixels: np.ndarray  # (H, W, 3) uint8, C-contiguous
    width: int
    height: int


@dataclass(frozen=True)
class ResizeSpec:
    """A model's input size.

    `shorter`: the shorter side becomes `size`, unless the longer side would then exceed `max_size`
    (DETR / GroundingDINO: 800 and 1333), to the pixel as the official GroundingDINO resize computes it
    (`get_size_with_aspect_ratio` in its `datasets/transforms.py`, see `target`). `longer`: the longer side
    becomes `size` (OWLv2, which then pads to a square). `square`: `size` x `size`, the aspect ratio not
    kept (Kosmos-2's preprocessing, under which normalized boxes stay valid). Images are scaled up as well
    as down, as the models were trained that way.
    """

    size: int = 800
    max_size: int | None = 1333
    mode: Literal["shorter", "longer", "square"] = "shorter"

    def target(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resizing an image of `width` x `height`."""
        if self.mode == "square":
            return self.size, self.size
        short, long = min(width, height), max(width, height)
        if self.mode == "longer":
            scale = self.size / long
            return max(1, round(width * scale)), max(1, round(height * scale))
        # GroundingDINO's rule, in its float operations and their order: the shorter side is `size`, or
        # max_size * short / long rounded (Python's round) when the longer side would pass max_size; the
        # longer side is then truncated, not rounded; an image already at that size is left as it is.
        # Only a shorter side that would round to 0 (aspect ratio over 2 * max_size) is held at 1.
        new_short = self.size
        if self.max_size is not None and float(long) / float(short) * new_short > self.max_size:
            new_short = max(1, int(round(self.max_size * float(short) / float(long))))
        if short == new_short:
            return width, height
        new_long = int(new_short * long / short)
        return (new_short, new_long) if width < height else (new_long, new_short)


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS  # width * height read from the header; above -> image_too_large
    min_side: int = DEFAULT_MIN_SIDE  # either side below -> image_too_small


# --- decoding ----------------------------------------------------------------------------------------

_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


def open_checked(data: bytes, resize: ResizeSpec | None,
                 limits: DecodeLimits) -> tuple[Image.Image, tuple[int, int]] | ImageFailure:
    """Open `data`, check its header against `limits`, set JPEG draft mode for `resize`, and decode.

    Returns the decoded PIL image (before orientation, mode conversion and resizing; smaller than the
    original when draft mode applied) and the original (width, height) after EXIF orientation."""
    if not data:
        return ImageFailure(RejectReason.IMAGE_DECODE_ERROR, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        return ImageFailure(RejectReason.IMAGE_TOO_LARGE, str(e)[:300])
    except UnidentifiedImageError:
        return ImageFailure(RejectReason.IMAGE_DECODE_ERROR, f"not a recognised image format ({len(data)} bytes)")
    except Exception as e:
        return ImageFailure(RejectReason.IMAGE_DECODE_ERROR, f"{type(e).__name__}: {e}"[:300])

    width, height = im.size
    if width * height > limits.max_pixels:
        return ImageFailure(RejectReason.IMAGE_TOO_LARGE,
                            f"{width}x{height} = {width * height} pixels > max_pixels {limits.max_pixels}")
    if min(width, height) < limits.min_side:
        return ImageFailure(RejectReason.IMAGE_TOO_SMALL, f"{width}x{height}, min side {limits.min_side}")

    try:
        orientation = _orientation(im)
        oriented_size = (height, width) if orientation in _SWAPS_AXES else (width, height)
        if resize is not None and im.format == "JPEG":
            tw, th = resize.target(*oriented_size)
            if orientation in _SWAPS_AXES:
                tw, th = th, tw
            # DCT scaling by 1/2, 1/4 or 1/8 while staying at least as large as the target
            im.draft("RGB" if im.mode in ("RGB", "YCbCr") else None, (tw, th))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
    except Image.DecompressionBombError as e:
        return ImageFailure(RejectReason.IMAGE_TOO_LARGE, str(e)[:300])
    except Exception as e:  # truncated data raises OSError; corrupt streams SyntaxError/ValueError/...
        return ImageFailure(RejectReason.IMAGE_DECODE_ERROR, f"{type(e).__name__}: {e}"[:300])
    return im, oriented_size


CHECK_DRAFT = ResizeSpec(size=1, max_size=None)  # asks JPEG draft mode for its smallest scale (1/8)


def check_image(data: bytes, limits: DecodeLimits) -> tuple[int, int] | ImageFailure:
    """The (width, height) after EXIF orientation of an image that passes `decode_image`'s checks (format,
    bomb and size limits, a whole decode of the stream, at the smallest JPEG draft scale to keep it
    cheap), or the failure with the same reason `decode_image` gives."""
    opened = open_checked(data, CHECK_DRAFT, limits)
    return opened if isinstance(opened, ImageFailure) else opened[1]


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1 = as stored); unreadable EXIF counts as 1 rather than failing the image."""
    try:
        value = int(im.getexif().get(0x0112, 1))
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB view of any PIL mode: alpha composited on white, 16-bit and float scaled, not clipped."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(im).astype(np.float64)
        # PNG/TIFF 16-bit greyscale opens as I;16 (or I): values are 0..65535, not 0..255
        peak = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        im = Image.fromarray(np.clip(arr * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        im = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_image(data: bytes, resize: ResizeSpec | None = None,
                 limits: DecodeLimits = DecodeLimits()) -> DecodedImage | ImageFailure:
    """Decode one image to 8-bit RGB at `resize` (or its own size); never raises."""
    opened = open_checked(data, resize, limits)
    if isinstance(opened, ImageFailure):
        return opened
    im, (width, height) = opened
    try:
        orientation = _orientation(im)
        if orientation != 1:
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # a broken EXIF block: keep the pixels as stored
                if orientation in _SWAPS_AXES:
                    width, height = height, width
        rgb = to_rgb(im)
        target = resize.target(width, height) if resize is not None else (width, height)
        if rgb.size != target:
            rgb = rgb.resize(target, Image.Resampling.BILINEAR, reducing_gap=3.0)
        pixels = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    except Exception as e:
        return ImageFailure(RejectReason.IMAGE_DECODE_ERROR, f"{type(e).__name__}: {e}"[:300])
    return DecodedImage(pixels=pixels, width=int(width), height=int(height))
