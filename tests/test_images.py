"""Image decoding for the detect stage (stages/images.py): every failure reason on generated bad images,
mode conversions, EXIF orientation, JPEG draft mode, the cheap header-and-stream check of the replay
backend. Reading bytes is tested in test_image_reader.py."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from schemas.rows import RejectReason
from stages.images import (
    DecodedImage,
    DecodeLimits,
    ImageFailure,
    ResizeSpec,
    check_image,
    decode_image,
    open_checked,
)

RED, BLUE = (220, 20, 20), (20, 20, 220)


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(w: int = 160, h: int = 120, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes | None) -> bytes:
    """A PNG written by hand: lets us make headers PIL would refuse to write (30000x30000) or modes it
    cannot write (16-bit RGB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    body = png_chunk(b"IHDR", ihdr)
    if rows is not None:
        body += png_chunk(b"IDAT", zlib.compress(rows))
    return b"\x89PNG\r\n\x1a\n" + body + png_chunk(b"IEND", b"")


def failure(result) -> RejectReason:
    assert isinstance(result, ImageFailure), f"expected a failure, got {type(result).__name__}"
    return result.reason


# --- failures ----------------------------------------------------------------------------------------


def test_zero_bytes_is_a_decode_error():
    assert failure(decode_image(b"")) == RejectReason.IMAGE_DECODE_ERROR


def test_garbage_bytes_are_a_decode_error():
    garbage = np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    assert failure(decode_image(garbage)) == RejectReason.IMAGE_DECODE_ERROR


def test_truncated_jpeg_is_a_decode_error():
    data = encode(photo(400, 300))
    assert isinstance(decode_image(data), DecodedImage)  # the whole file decodes
    assert failure(decode_image(data[: len(data) // 2])) == RejectReason.IMAGE_DECODE_ERROR


def test_truncated_png_is_a_decode_error():
    data = encode(photo(200, 200), "PNG")
    assert failure(decode_image(data[: len(data) // 3])) == RejectReason.IMAGE_DECODE_ERROR


def test_30000_square_png_header_is_too_large_before_decoding():
    # no pixel data at all: rejected from the header alone
    result = decode_image(raw_png(30000, 30000, 8, 2, rows=None))
    assert failure(result) == RejectReason.IMAGE_TOO_LARGE
    assert "900000000" in result.detail  # 30000 * 30000, said by our check or PIL's own


def test_pixel_limit_comes_from_config():
    data = encode(photo(50, 50), "PNG")
    assert isinstance(decode_image(data, limits=DecodeLimits(max_pixels=2500)), DecodedImage)
    assert failure(decode_image(data, limits=DecodeLimits(max_pixels=2499))) == RejectReason.IMAGE_TOO_LARGE


@pytest.mark.parametrize("size", [(1, 1), (1, 40), (40, 1), (9, 300)])
def test_tiny_images_are_too_small(size):
    data = encode(Image.new("RGB", size, RED), "PNG")
    assert failure(decode_image(data)) == RejectReason.IMAGE_TOO_SMALL


def test_min_side_comes_from_config():
    data = encode(Image.new("RGB", (1, 1), RED), "PNG")
    assert isinstance(decode_image(data, limits=DecodeLimits(min_side=1)), DecodedImage)
    data = encode(Image.new("RGB", (30, 30), RED), "PNG")
    assert failure(decode_image(data, limits=DecodeLimits(min_side=31))) == RejectReason.IMAGE_TOO_SMALL


# --- mode conversions --------------------------------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (40, 30), (0, 255, 255, 0))  # full magenta + yellow = red
    out = decode_image(encode(cmyk))
    assert isinstance(out, DecodedImage) and out.pixels.shape == (30, 40, 3)
    r, g, b = out.pixels[15, 20].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_16bit_grey_png_is_scaled_not_clipped():
    values = np.array([[0, 257 * 64, 257 * 128, 65535]] * 12, np.uint16).repeat(3, axis=1)  # 12 x 12
    im = Image.fromarray(values)
    assert im.mode.startswith("I;16")
    out = decode_image(encode(im, "PNG"))
    assert isinstance(out, DecodedImage)
    assert out.pixels[0, ::3, 0].tolist() == [0, 64, 128, 255]  # PIL's own convert would clip to 255
    assert (out.pixels[..., 0] == out.pixels[..., 2]).all()


def test_16bit_rgb_png_keeps_colours():
    h, w = 12, 12
    px = np.zeros((h, w, 3), ">u2")
    px[..., 0] = 0xC800  # red 200 in the high byte
    px[..., 2] = 0x1400  # blue 20
    rows = b"".join(b"\x00" + px[y].tobytes() for y in range(h))
    out = decode_image(raw_png(w, h, 16, 2, rows))
    assert isinstance(out, DecodedImage)
    assert out.pixels[5, 5].tolist() == [200, 0, 20]


def test_palette_with_transparency_is_composited_on_white():
    p = Image.new("P", (20, 20), 0)
    p.putpalette([0, 0, 0] + list(RED) + [0] * (256 * 3 - 6))
    p.paste(1, (10, 0, 20, 20))  # right half red, left half palette index 0 = transparent
    out = decode_image(encode(p, "PNG", transparency=0))
    assert isinstance(out, DecodedImage)
    assert out.pixels[10, 2].tolist() == [255, 255, 255]
    assert out.pixels[10, 15].tolist() == list(RED)


def test_grey_alpha_la_is_composited_on_white():
    la = Image.new("LA", (16, 16), (0, 255))
    la.paste((0, 0), (0, 0, 8, 16))  # left half fully transparent black
    out = decode_image(encode(la, "PNG"))
    assert isinstance(out, DecodedImage)
    assert out.pixels[4, 2].tolist() == [255, 255, 255]
    assert out.pixels[4, 12].tolist() == [0, 0, 0]


def test_rgba_half_transparent_blends_with_white():
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 128))
    out = decode_image(encode(rgba, "PNG"))
    assert isinstance(out, DecodedImage)
    assert abs(int(out.pixels[8, 8, 0]) - 127) <= 1


def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (200, 100), BLUE)
    stored.paste(RED, (0, 0, 100, 100))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the stored left edge becomes the top
    out = decode_image(encode(stored, exif=exif.tobytes(), quality=95))
    assert isinstance(out, DecodedImage)
    assert (out.width, out.height) == (100, 200)
    assert out.pixels.shape == (200, 100, 3)
    assert np.abs(out.pixels[30, 50].astype(int) - RED).max() < 40  # top: red
    assert np.abs(out.pixels[170, 50].astype(int) - BLUE).max() < 40  # bottom: blue


# --- resizing and draft mode -------------------------------------------------------------------------


def test_resize_spec_shorter_side_with_cap():
    spec = ResizeSpec(800, 1333, "shorter")  # GroundingDINO's rule: the longer side truncated, not rounded
    assert spec.target(640, 480) == (1066, 800)
    assert spec.target(480, 640) == (800, 1066)
    assert spec.target(3000, 1000) == (1332, 444)  # 2400 would pass the 1333 cap: 444 = round(1333 / 3)
    assert spec.target(100, 100) == (800, 800)  # small images are scaled up, like the model's training


def test_resize_spec_longer_side():
    assert ResizeSpec(960, None, "longer").target(1920, 1080) == (960, 540)
    assert ResizeSpec(960, None, "longer").target(300, 600) == (480, 960)


def test_jpeg_draft_decodes_at_a_reduced_scale_then_resizes():
    data = encode(photo(2000, 1500))
    spec = ResizeSpec(300, None, "shorter")  # target 400 x 300
    opened = open_checked(data, spec, DecodeLimits())
    assert not isinstance(opened, ImageFailure)
    im, original = opened
    assert original == (2000, 1500)
    assert im.size == (500, 375)  # DCT-scaled by 1/4: the smallest scale still >= 400 x 300
    out = decode_image(data, spec)
    assert isinstance(out, DecodedImage)
    assert out.pixels.shape == (300, 400, 3) and (out.width, out.height) == (2000, 1500)


def test_draft_respects_exif_rotation():
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(photo(1600, 800), exif=exif.tobytes())  # displayed as 800 x 1600
    out = decode_image(data, ResizeSpec(200, None, "shorter"))
    assert isinstance(out, DecodedImage)
    assert (out.width, out.height) == (800, 1600)
    assert out.pixels.shape == (400, 200, 3)


def test_decoded_pixels_follow_the_source():
    im = Image.new("RGB", (64, 48), RED)
    im.paste(BLUE, (32, 0, 64, 48))
    out = decode_image(encode(im, "PNG"), ResizeSpec(24, None, "shorter"))
    assert isinstance(out, DecodedImage) and out.pixels.shape == (24, 32, 3)
    assert out.pixels[12, 4].tolist() == list(RED) and out.pixels[12, 28].tolist() == list(BLUE)


def test_square_resize_ignores_the_aspect_ratio():
    assert ResizeSpec(16, None, "square").target(200, 100) == (16, 16)
    out = decode_image(encode(photo(200, 100)), ResizeSpec(16, None, "square"))
    assert isinstance(out, DecodedImage) and out.pixels.shape == (16, 16, 3) and (out.width, out.height) == (200, 100)


# --- the header-and-stream check (replay backend) ----------------------------------------------------

BAD_IMAGES = {
    "zero_bytes": b"",
    "garbage": np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
    "truncated_jpeg": encode(photo(400, 300))[:6000],
    "truncated_png": encode(photo(200, 200), "PNG")[:20000],
    "bomb_header": raw_png(30000, 30000, 8, 2, rows=None),
    "one_pixel": encode(Image.new("RGB", (1, 1), RED), "PNG"),
    "too_thin": encode(Image.new("RGB", (9, 300), RED), "PNG"),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_check_image_fails_with_the_reason_decoding_gives(name):
    data = BAD_IMAGES[name]
    assert failure(check_image(data, DecodeLimits())) == failure(decode_image(data, ResizeSpec(64, None)))


def test_check_image_passes_good_images_with_their_oriented_size():
    exif = Image.Exif()
    exif[0x0112] = 6
    assert check_image(encode(photo(1600, 800), exif=exif.tobytes()), DecodeLimits()) == (800, 1600)
    assert check_image(encode(photo(120, 80), "PNG"), DecodeLimits()) == (120, 80)
    assert check_image(encode(photo(50, 50), "PNG"), DecodeLimits(max_pixels=2499)).reason == RejectReason.IMAGE_TOO_LARGE
