"""The `Detector` protocol every detection backend implements, and the candidate list they return.

`DetectStage` (stages/detect.py) turns a batch of rows into `ImageInput`s (decoded pixels) and
`ChunkPrompt`s (the row's caption and noun chunks) and calls `detector.detect(images, prompts)`; it gets
back one `Detections` per image: raw candidates before threshold or NMS, every (box, chunk) pair whose
score is at least the floor, each chunk's best `chunk_candidates` and up to `max_candidates` per image in
all (see `finalize`). `select` re-thresholds them on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from schemas.rows import RejectReason


@dataclass(frozen=True)
class ImageInput:
    """One image of a batch. `pixels` is (H, W, 3) uint8 RGB at the detector's input size (the whole
    image, resized without cropping), or None for backends that need no image (replay)."""

    key: str
    pixels: np.ndarray | None = None
    # GRIT-20M `noun_chunks` of the source row, `[start, end, x1, y1, x2, y2, score]` lists: read by the
    # replay backend's grit20m mode only
    source_boxes: list[list[float]] | None = None


@dataclass(frozen=True)
class ChunkPrompt:
    """The chunks of one caption to ground: their text, their (start, end) char spans in the caption, and
    the caption (the `caption` prompt form reads it; empty when the prompt was built from phrases only)."""

    phrases: tuple[str, ...]
    spans: tuple[tuple[int, int], ...] = ()
    caption: str = ""

    @classmethod
    def from_caption(cls, caption: str, spans: Sequence[tuple[int, int]]) -> ChunkPrompt:
        spans = tuple((int(s), int(e)) for s, e in spans)
        return cls(tuple(caption[s:e] for s, e in spans), spans, caption)


@dataclass
class Detections:
    """Candidates of one image, parallel arrays sorted by (box, chunk).

    `box` numbers distinct boxes 0.. in order of falling `box_score`; `chunk` indexes the prompt's
    chunks (-1: the box's best tokens belong to no chunk); corners are normalized xyxy of the original
    image. When empty, `reason`/`detail` say why (the stage rejects the row with them)."""

    box: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    chunk: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    xyxy: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float64))
    score: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    box_score: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    reason: RejectReason | None = None
    detail: str = ""

    def __len__(self) -> int:
        return len(self.box)

    @classmethod
    def empty(cls, reason: RejectReason, detail: str) -> Detections:
        return cls(reason=reason, detail=detail)


@runtime_checkable
class Detector(Protocol):
    """A grounding detector. `needs_pixels` False means `ImageInput.pixels` may be None (replay)."""

    needs_pixels: bool

    def detect(self, images: Sequence[ImageInput], prompts: Sequence[ChunkPrompt]) -> list[Detections]:
        """One `Detections` per image, in order; `prompts[i]` holds the chunks of `images[i]`."""
        ...


def finalize(box: np.ndarray, chunk: np.ndarray, xyxy: np.ndarray, score: np.ndarray, box_score: np.ndarray,
             *, floor: float, max_candidates: int, chunk_candidates: int = 0, what: str = "box") -> Detections:
    """Raw (box, chunk) entries of one image -> `Detections`: keep `score >= floor`; of those, each chunk's
    best `chunk_candidates` entries, and the image's best `max_candidates` (highest scores; ties by box
    then chunk), so that near-duplicates of one chunk never take every place of another; boxes renumbered
    by falling box score, entries sorted by (box, chunk). Duplicate (box, chunk) entries keep their best
    score. Unassigned entries (chunk -1) only ever take places under `max_candidates`."""
    box = np.asarray(box, np.int64)
    chunk = np.asarray(chunk, np.int64)
    xyxy = np.asarray(xyxy, np.float64).reshape(-1, 4)
    score = np.asarray(score, np.float32)
    box_score = np.asarray(box_score, np.float32)
    keep = score >= np.float32(floor)
    if not keep.any():
        return Detections.empty(RejectReason.NO_DETECTION,
                                f"no {what} scored >= floor {floor}" if len(score) else f"no {what} found")
    box, chunk, xyxy, score, box_score = box[keep], chunk[keep], xyxy[keep], score[keep], box_score[keep]

    # best score first; ties broken by (box, chunk) so the cut is deterministic
    order = np.lexsort((chunk, box, -score.astype(np.float64)))
    _, first = np.unique(np.stack([box[order], chunk[order]], 1), axis=0, return_index=True)
    order = order[np.sort(first)]
    if len(order) > max_candidates:
        kept = np.arange(len(order)) < max_candidates
        if chunk_candidates > 0:
            ranked = chunk[order]
            kept |= (ranked >= 0) & (_rank_within(ranked) < chunk_candidates)
        order = order[kept]
    box, chunk, xyxy, score, box_score = box[order], chunk[order], xyxy[order], score[order], box_score[order]

    # renumber boxes 0.. by falling box score (ties: original number)
    ids, inverse = np.unique(box, return_inverse=True)
    best = np.full(len(ids), -np.inf)
    np.maximum.at(best, inverse, box_score.astype(np.float64))
    rank = np.empty(len(ids), np.int64)
    rank[np.lexsort((ids, -best))] = np.arange(len(ids))
    box = rank[inverse]

    order = np.lexsort((chunk, box))
    return Detections(box=box[order].astype(np.int32), chunk=chunk[order].astype(np.int32),
                      xyxy=np.ascontiguousarray(xyxy[order]), score=score[order],
                      box_score=box_score[order])


def _rank_within(groups: np.ndarray) -> np.ndarray:
    """Each element's position among the elements of its group, in array order (0 = first of its group)."""
    idx = np.argsort(groups, kind="stable")
    sorted_groups = groups[idx]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    sizes = np.diff(np.r_[starts, len(groups)])
    rank = np.empty(len(groups), np.int64)
    rank[idx] = np.arange(len(groups)) - np.repeat(starts, sizes)
    return rank
