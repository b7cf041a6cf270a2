"""`grit synth`: procedural GrIT shards -- coloured shapes with captions and their exact boxes.

Each scene holds 1-3 shapes (circle, square, triangle; six colours; distinct colour-shape pairs; no
overlaps) on a plain background, captioned "a red circle to the left of a blue square", "a green triangle",
"a red circle, a blue square and a yellow triangle". Every shape phrase is a noun chunk and its own
referring expression (so each shape is grounded), with its box exact to the pixel. The shards have the
GRIT schema of `schemas.tables` and are built with `schemas.grounded_text`, so grounding can be trained
and measured offline. Output, deterministic from the seed (each shard from (seed, shard) alone)::

    <out>/shard-00000.parquet                 GRIT columns (+ `image_bytes` with embed_images)
    <out>/images/shard-00000/<key>.png        the images; `url` holds this path relative to <out>
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field

from schemas.grounded_text import build_grounded_caption, build_markdown_caption
from schemas.tables import GRIT_FIELDS

COLOURS = {
    "red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 220),
    "yellow": (235, 200, 30), "purple": (148, 70, 189), "orange": (255, 127, 14),
}
SHAPES = ("circle", "square", "triangle")
IMAGE_BYTES_FIELD = pa.field("image_bytes", pa.binary())

Box = tuple[float, float, float, float]


class SynthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shards: int = Field(4, ge=1)
    rows_per_shard: int = Field(1000, ge=1)
    seed: int = 0
    min_side: int = Field(96, ge=32)  # image width and height are drawn from [min_side, max_side]
    max_side: int = Field(160, ge=32)
    min_objects: int = Field(1, ge=1)
    max_objects: int = Field(3, ge=1, le=3)
    min_scale: float = Field(0.2, gt=0, lt=1)  # shape size as a fraction of the shorter image side
    max_scale: float = Field(0.45, gt=0, lt=1)
    embed_images: bool = False


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    box_px: tuple[int, int, int, int]  # x0, y0, x1, y1 pixel extent, end-exclusive

    @property
    def phrase(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.kind}"

    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box_px
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    caption: str
    spans: list[tuple[int, int, Box]]  # (start, end, normalized box) per shape phrase, caption order


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _relation(a: Shape, b: Shape) -> str:
    (ax, ay), (bx, by) = a.centre(), b.centre()
    if abs(ax - bx) >= abs(ay - by):
        return "to the left of" if ax < bx else "to the right of"
    return "above" if ay < by else "below"


def _place(rng: random.Random, cfg: SynthConfig, w: int, h: int) -> list[Shape]:
    wanted = rng.randint(cfg.min_objects, cfg.max_objects)
    kinds = rng.sample([(c, k) for c in COLOURS for k in SHAPES], wanted)
    shapes: list[Shape] = []
    for colour, kind in kinds:
        for _ in range(50):  # rejection sampling; a crowded scene simply ends up with fewer shapes
            s = int(rng.uniform(cfg.min_scale, cfg.max_scale) * min(w, h))
            x0, y0 = rng.randrange(0, w - s + 1), rng.randrange(0, h - s + 1)
            box = (x0, y0, x0 + s, y0 + s)
            if not any(_overlaps(box, other.box_px) for other in shapes):
                shapes.append(Shape(colour, kind, box))
                break
    return shapes


def _draw(shapes: list[Shape], w: int, h: int, background: tuple[int, int, int]) -> Image.Image:
    im = Image.new("RGB", (w, h), background)
    draw = ImageDraw.Draw(im)
    for sh in shapes:
        x0, y0, x1, y1 = sh.box_px
        fill = COLOURS[sh.colour]
        # PIL's shape coordinates are inclusive: the last filled pixel is x1 - 1.
        if sh.kind == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif sh.kind == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    return im


def make_scene(rng: random.Random, cfg: SynthConfig) -> Scene:
    w, h = rng.randint(cfg.min_side, cfg.max_side), rng.randint(cfg.min_side, cfg.max_side)
    background = tuple(rng.randint(200, 255) for _ in range(3))
    shapes = _place(rng, cfg, w, h)
    if len(shapes) == 2:
        pieces = [shapes[0].phrase, f" {_relation(shapes[0], shapes[1])} ", shapes[1].phrase]
    elif len(shapes) == 3:
        pieces = [shapes[0].phrase, ", ", shapes[1].phrase, " and ", shapes[2].phrase]
    else:
        pieces = [shapes[0].phrase]
    caption, spans = "", []
    phrase_shapes = iter(shapes)
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            sh = next(phrase_shapes)
            x0, y0, x1, y1 = sh.box_px
            spans.append((len(caption), len(caption) + len(piece), (x0 / w, y0 / h, x1 / w, y1 / h)))
        caption += piece
    return Scene(_draw(shapes, w, h, background), caption, spans)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def synth_shard(cfg: SynthConfig, shard: int) -> tuple[pa.Table, dict[str, bytes]]:
    """One shard's table and its images by relative path; a function of (cfg, shard) only."""
    rng = random.Random(f"grit-synth:{cfg.seed}:{shard}")
    rows: dict[str, list] = {f.name: [] for f in GRIT_FIELDS}
    rows["image_bytes"] = []
    images: dict[str, bytes] = {}
    for i in range(cfg.rows_per_shard):
        scene = make_scene(rng, cfg)
        key = f"synth{cfg.seed}-{shard:05d}-{i:05d}"
        rel = f"images/shard-{shard:05d}/{key}.png"
        data = _png(scene.image)
        images[rel] = data
        entries = [[float(s), float(e), *box, 1.0] for s, e, box in scene.spans]
        tagged = [(s, e, [box]) for s, e, box in scene.spans]
        rows["key"].append(key)
        rows["url"].append(rel)
        rows["caption"].append(scene.caption)
        rows["width"].append(scene.image.width)
        rows["height"].append(scene.image.height)
        rows["noun_chunks"].append(entries)
        rows["ref_exps"].append(entries)
        rows["grounded_caption"].append(build_grounded_caption(scene.caption, tagged))
        rows["markdown_caption"].append(build_markdown_caption(scene.caption, tagged))
        rows["image_bytes"].append(data)
    fields = list(GRIT_FIELDS)
    if cfg.embed_images:
        fields.append(IMAGE_BYTES_FIELD)
    else:
        del rows["image_bytes"]
    return pa.table(rows, schema=pa.schema(fields)), images


def write_synth(out: str, cfg: SynthConfig) -> list[str]:
    """Write `cfg.shards` shards (and their PNGs) under `out`; returns the shard URLs."""
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    written = []
    for shard in range(cfg.shards):
        table, images = synth_shard(cfg, shard)
        fs.makedirs(f"{root}/images/shard-{shard:05d}", exist_ok=True)
        for rel, data in images.items():
            with fs.open(f"{root}/{rel}", "wb") as f:
                f.write(data)
        path = f"{root}/shard-{shard:05d}.parquet"
        with fs.open(path, "wb") as f:
            pq.write_table(table, f)
        written.append(fs.unstrip_protocol(path))
    return written
