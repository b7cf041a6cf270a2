"""The report's gallery: a deterministic sample of rows, each with its image, its boxes at three points
of the pipeline (detector candidates before NMS, `select`'s pairs, the final GRIT boxes), its caption with
the noun-chunk spans marked, and its grounded and Markdown captions.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from grit_pipeline.report.boxes import (
    DrawnBox,
    candidate_boxes,
    chunk_color,
    chunk_texts,
    final_boxes,
    pair_boxes,
)
from grit_pipeline.report.row_trace import RowTrace, trace_rows
from grit_pipeline.report.run_files import RunFiles
from grit_pipeline.report.thumbnails import ImageUnavailable, load_images, thumbnail
from stages.image_reader import ImageLocation


def key_rank(key: str, seed: int) -> bytes:
    return hashlib.blake2b(key.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()


def sample_keys(keys: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """`n` keys chosen by a keyed hash: the same keys for the same run and seed, whatever the shard
    layout or read order, and spread over all shards. Returned in hash order."""
    return sorted(dict.fromkeys(keys), key=lambda k: (key_rank(k, seed), k))[:n]


class KeySample:
    """`sample_keys` over rows read shard by shard, holding `n` keys instead of every key: `add` each
    shard's keys (in ascending shard order), then `chosen` gives key -> the first shard that held it, in
    hash order. A key dropped once can never come back: the keys held only get better."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed = n, seed
        self._held: dict[str, tuple[bytes, int]] = {}

    def add(self, keys: Sequence[str], shard: int) -> None:
        if self.n <= 0:
            return
        merged = dict(self._held)
        for k in keys:
            if k not in merged:
                merged[k] = (key_rank(k, self.seed), shard)
        self._held = dict(sorted(merged.items(), key=lambda kv: (kv[1][0], kv[0]))[: self.n])

    def chosen(self) -> dict[str, int]:
        return {k: shard for k, (_, shard) in self._held.items()}


@dataclass
class CaptionPiece:
    text: str
    chunk: int | None = None  # index into the row's chunks when this piece is a noun chunk

    @property
    def color(self) -> str | None:
        return None if self.chunk is None else chunk_color(self.chunk)


@dataclass
class GalleryItem:
    key: str
    shard: int
    caption: str
    width: int | None
    height: int | None
    image_uri: str | None
    view_w: int
    view_h: int
    image_error: str | None
    pieces: list[CaptionPiece]
    layers: dict[str, list[DrawnBox]]
    layer_totals: dict[str, int]
    expressions: list[tuple[str, str]] = field(default_factory=list)  # (text, colour) of kept ref-exps
    grounded_caption: str | None = None
    markdown_caption: str | None = None
    dropped: dict | None = None
    url: str | None = None


def caption_pieces(caption: str, chunks: list[dict] | None) -> list[CaptionPiece]:
    """The caption cut at noun-chunk boundaries (chunks never overlap; bad spans are skipped)."""
    pieces, pos = [], 0
    for i, c in sorted(enumerate(chunks or []), key=lambda ic: (ic[1]["start"], ic[0])):
        start, end = c["start"], c["end"]
        if start < pos or end <= start or end > len(caption):
            continue
        if start > pos:
            pieces.append(CaptionPiece(caption[pos:start]))
        pieces.append(CaptionPiece(caption[start:end], i))
        pos = end
    if pos < len(caption):
        pieces.append(CaptionPiece(caption[pos:]))
    return pieces


def build_item(trace: RowTrace, image, max_candidates: int, thumb_side: int) -> GalleryItem:
    """One card; `image` is the decoded thumbnail-sized image or the ImageUnavailable that explains why not."""
    row = trace.row
    caption = row.get("caption") or ""
    chunks = row.get("chunks")
    texts = chunk_texts(caption, chunks)
    cand = candidate_boxes(row.get("candidates"), texts)
    layers = {
        "candidates": cand[:max_candidates],
        "selected": pair_boxes(row.get("pairs"), texts),
        "final": final_boxes(caption, row.get("noun_chunks"), chunks),
    }
    totals = {"candidates": len(cand), "selected": len(layers["selected"]), "final": len(layers["final"])}

    image_uri, error = None, None
    w, h = row.get("width"), row.get("height")
    view_w, view_h = thumb_side, round(thumb_side * h / w) if w and h else round(thumb_side * 0.75)
    if isinstance(image, ImageUnavailable):
        error = str(image)
    else:
        thumb = thumbnail(image)
        image_uri, view_w, view_h = thumb.data_uri, thumb.width, thumb.height

    expressions = []
    seen = set()
    for e, b in zip(row.get("ref_exps") or [], layers["final"], strict=True):
        span = (int(e[0]), int(e[1]))
        if span not in seen:
            seen.add(span)
            expressions.append((caption[span[0]:span[1]], b.color))
    return GalleryItem(
        key=trace.key, shard=trace.shard, caption=caption, width=w, height=h, url=row.get("url"),
        image_uri=image_uri, view_w=view_w, view_h=view_h, image_error=error,
        pieces=caption_pieces(caption, chunks), layers=layers, layer_totals=totals, expressions=expressions,
        grounded_caption=row.get("grounded_caption"), markdown_caption=row.get("markdown_caption"),
        dropped=trace.dropped,
    )


def sample_rows(run: RunFiles, stage: str, shards: Sequence[int], n: int, seed: int = 0) -> dict[str, int]:
    """key -> source shard of `n` rows of `stage`'s output in `shards`, chosen by keyed hash (`sample_keys`),
    reading the key column one shard at a time."""
    sample = KeySample(n, seed)
    for shard in sorted(shards):
        sample.add(run.read(stage, [shard], columns=["key"])["key"].to_pylist(), shard)
    return sample.chosen()


def build_gallery(run: RunFiles, rows: dict[str, int], max_candidates: int = 40,
                  thumb_side: int = 448) -> list[GalleryItem]:
    """Gallery items for `rows` (key -> source shard, in the order shown: `sample_rows`)."""
    chosen = list(rows)
    by_shard: dict[int, list[str]] = defaultdict(list)
    for k in chosen:
        by_shard[rows[k]].append(k)
    traces: dict[str, RowTrace] = {}
    for shard in sorted(by_shard):
        for t in trace_rows(run, shard, by_shard[shard]):
            traces[t.key] = t
    images = load_images([ImageLocation.from_row(traces[k].row) for k in chosen], run.allowed_images,
                         longest_side=thumb_side)
    return [build_item(traces[k], img, max_candidates, thumb_side) for k, img in zip(chosen, images, strict=True)]
