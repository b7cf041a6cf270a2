"""Draw a row's boxes on its image with PIL (`grit inspect --png`).

A normalized box (x1, y1, x2, y2) covers pixel columns round(x1*W) .. round(x2*W)-1 and rows
round(y1*H) .. round(y2*H)-1; its outline is drawn inside that area, so the outermost pixels of the box
carry the box colour. Labels sit above the top-left corner (inside it when the box touches the top).
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageColor, ImageDraw, ImageFont

from grit_pipeline.report.boxes import DrawnBox


def pixel_rect(box: DrawnBox, width: int, height: int) -> tuple[int, int, int, int]:
    """Inclusive pixel rectangle (left, top, right, bottom) covered by `box` on a width x height image."""
    left = min(max(round(box.x1 * width), 0), width - 1)
    top = min(max(round(box.y1 * height), 0), height - 1)
    right = min(max(round(box.x2 * width) - 1, left), width - 1)
    bottom = min(max(round(box.y2 * height) - 1, top), height - 1)
    return left, top, right, bottom


def line_width_for(width: int, height: int) -> int:
    return max(2, round(min(width, height) / 160))


def draw_boxes(image: Image.Image, boxes: Sequence[DrawnBox], labels: bool = True,
               line_width: int | None = None) -> Image.Image:
    """A copy of `image` (RGB) with `boxes` outlined in their chunk colours, best score drawn last (on top)."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    lw = line_width or line_width_for(w, h)
    font = ImageFont.load_default(size=max(11, round(min(w, h) / 32)))
    ordered = sorted(boxes, key=lambda b: b.score)
    for b in ordered:
        draw.rectangle(pixel_rect(b, w, h), outline=ImageColor.getrgb(b.color), width=lw)
    if labels:
        for b in ordered:
            left, top, _, _ = pixel_rect(b, w, h)
            tl, tt, tr, tb = draw.textbbox((0, 0), b.label, font=font)
            tw, th = tr - tl + 6, tb - tt + 4
            y = top - th if top - th >= 0 else top + lw
            x = left + lw if y > top else left
            draw.rectangle([x, y, x + tw, y + th - 1], fill=ImageColor.getrgb(b.color))
            draw.text((x + 3 - tl, y + 2 - tt), b.label, fill=(255, 255, 255), font=font)
    return out
