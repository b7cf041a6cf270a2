"""The boxes a row carries at each stage, in one shape for drawing (report overlays, `inspect --png`).

- `detect`: candidates before threshold and NMS (several chunk scores may share one box; the box is drawn
  once, labelled with its best chunk);
- `select`: the chunk-box pairs that survived threshold and NMS;
- `compose` (final GRIT): `noun_chunks` entries `[start, end, x1, y1, x2, y2, score]`.
Corners are normalized xyxy; `chunk` indexes the row's `chunks` list (-1: no chunk) and picks the colour.
"""

from __future__ import annotations

from dataclasses import dataclass

# Colour per chunk index (Tableau 10, readable on photos with a dark outline); grey for "no chunk".
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
           "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
NO_CHUNK = "#9ca3af"

BOX_STAGES = ("detect", "select", "compose")


def chunk_color(chunk: int) -> str:
    return NO_CHUNK if chunk < 0 else PALETTE[chunk % len(PALETTE)]


@dataclass(frozen=True)
class DrawnBox:
    x1: float
    y1: float
    x2: float
    y2: float
    chunk: int
    score: float
    label: str

    @property
    def color(self) -> str:
        return chunk_color(self.chunk)


def chunk_texts(caption: str | None, chunks: list[dict] | None) -> list[str]:
    return [caption[c["start"]:c["end"]] if caption else f"chunk {i}" for i, c in enumerate(chunks or [])]


def _label(texts: list[str], chunk: int, score: float) -> str:
    name = texts[chunk] if 0 <= chunk < len(texts) else "(no chunk)"
    return f"{name} {score:.2f}"


def candidate_boxes(candidates: list[dict] | None, texts: list[str]) -> list[DrawnBox]:
    """One box per detector box id, with its best-scoring chunk; sorted by score, best first."""
    best: dict[int, dict] = {}
    for c in candidates or []:
        cur = best.get(c["box"])
        better = cur is None or c["score"] > cur["score"] or (c["score"] == cur["score"] and c["chunk"] < cur["chunk"])
        if better:
            best[c["box"]] = c
    ordered = sorted(best.values(), key=lambda c: (-c["score"], c["box"]))
    return [DrawnBox(c["x1"], c["y1"], c["x2"], c["y2"], c["chunk"], c["score"], _label(texts, c["chunk"], c["score"]))
            for c in ordered]


def pair_boxes(pairs: list[dict] | None, texts: list[str]) -> list[DrawnBox]:
    return [DrawnBox(p["x1"], p["y1"], p["x2"], p["y2"], p["chunk"], p["score"], _label(texts, p["chunk"], p["score"]))
            for p in pairs or []]


def final_boxes(caption: str, noun_chunks: list[list[float]] | None, chunks: list[dict] | None) -> list[DrawnBox]:
    """GRIT `noun_chunks` entries; the colour follows the chunks-stage chunk with the same span."""
    index = {(c["start"], c["end"]): i for i, c in enumerate(chunks or [])}
    out = []
    for e in noun_chunks or []:
        start, end = int(e[0]), int(e[1])
        chunk = index.get((start, end), -1)
        out.append(DrawnBox(e[2], e[3], e[4], e[5], chunk, e[6], f"{caption[start:end]} {e[6]:.2f}"))
    return out


def boxes_for_stage(stage: str, row: dict) -> list[DrawnBox]:
    """The boxes of one joined row (ingest + chunks + the stage's own columns) at `stage`."""
    texts = chunk_texts(row.get("caption"), row.get("chunks"))
    if stage == "detect":
        return candidate_boxes(row.get("candidates"), texts)
    if stage == "select":
        return pair_boxes(row.get("pairs"), texts)
    if stage == "compose":
        return final_boxes(row.get("caption") or "", row.get("noun_chunks"), row.get("chunks"))
    raise ValueError(f"stage {stage!r} has no boxes; boxes exist at {', '.join(BOX_STAGES)}")
