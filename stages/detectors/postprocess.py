"""Model outputs -> raw (box, chunk) entries, shared by the model backends.

Our own post-processing from logits instead of `processor.post_process_grounded_object_detection`:
we need per-chunk scores through our token -> chunk map anyway, and it keeps us independent of that API's
renamed threshold argument (`box_threshold` -> `threshold`) across transformers versions.

For a box (query) with token probabilities p[t]:
- `box_score` = max over the prompt's tokens (special tokens and separators included, as in the
  official GroundingDINO `predict`);
- chunk j's score = max of p over chunk j's tokens;
- a box scoring >= floor for no chunk, but >= floor overall, is kept once with chunk -1 (unassigned) and
  the max over its unmapped tokens as score.
"""

from __future__ import annotations

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) normalized centre/size boxes -> corners clipped to [0, 1]."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    cx, cy, w, h = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    return np.clip(xyxy, 0.0, 1.0)


def chunk_scores(probs: np.ndarray, token_chunk: np.ndarray, n_chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, T) token probabilities -> ((Q, n_chunks) max over each chunk's tokens, (Q,) max over unmapped
    tokens). A chunk without tokens scores 0."""
    probs = np.asarray(probs, np.float32)
    q = probs.shape[0]
    per_chunk = np.zeros((q, n_chunks), np.float32)
    for j in np.unique(token_chunk[token_chunk >= 0]):
        per_chunk[:, j] = probs[:, token_chunk == j].max(1)
    unmapped = token_chunk < 0
    rest = probs[:, unmapped].max(1) if unmapped.any() else np.zeros(q, np.float32)
    return per_chunk, rest


def entries_from_probs(probs: np.ndarray, token_chunk: np.ndarray, xyxy: np.ndarray, n_chunks: int,
                       floor: float, first_box: int = 0) -> tuple[np.ndarray, ...]:
    """One pass's (Q, T) probabilities -> raw entries (box, chunk, xyxy, score, box_score) with
    score >= floor. Boxes are numbered `first_box + query index` so several passes never collide;
    boxes of zero area (after clipping to the image) are dropped."""
    probs = np.asarray(probs, np.float32)
    xyxy = np.asarray(xyxy, np.float64).reshape(-1, 4)
    floor32 = np.float32(floor)
    box_score = probs.max(1) if probs.shape[1] else np.zeros(len(probs), np.float32)
    live = (box_score >= floor32) & (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    queries = np.flatnonzero(live)
    if len(queries) == 0:
        return _empty()
    per_chunk, rest = chunk_scores(probs[queries], token_chunk, n_chunks)
    in_pass = np.zeros(n_chunks, bool)  # chunks with tokens in this pass; the others were not asked
    in_pass[np.unique(token_chunk[token_chunk >= 0])] = True
    qi, cj = np.nonzero((per_chunk >= floor32) & in_pass)
    assigned = np.zeros(len(queries), bool)
    assigned[qi] = True
    lone = np.flatnonzero(~assigned)  # above the floor overall, but for no chunk
    q_all = np.concatenate([qi, lone])
    chunk = np.concatenate([cj, np.full(len(lone), -1)])
    score = np.concatenate([per_chunk[qi, cj], rest[lone]])
    src = queries[q_all]
    return (src + first_box, chunk, xyxy[src], score, box_score[src])


def _empty() -> tuple[np.ndarray, ...]:
    return (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0, np.float32),
            np.zeros(0, np.float32))


def concat_entries(parts: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    if not parts:
        return _empty()
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(5))
