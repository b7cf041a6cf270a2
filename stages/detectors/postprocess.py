"""Model outputs -> raw (box, chunk) entries, shared by the model backends.

Our own post-processing from logits instead of `processor.post_process_grounded_object_detection`:
we need per-chunk scores through our token -> chunk map anyway, and it keeps us independent of that API's
renamed threshold argument (`box_threshold` -> `threshold`) across transformers versions.

For a box (query) with token probabilities p[t] (sigmoid of the logits) and the pass's positive map (which
tokens belong to which chunk, `prompts.positive_map`):
- chunk j's score (`rule`): the **mean** of p over chunk j's tokens (the default: GLIP scores a phrase with
  `score_agg="MEAN"`, `convert_grounding_to_od_logits` in its `modeling/rpn/inference.py`; GroundingDINO's
  `create_positive_map_from_span` normalizes each phrase's row to sum 1, so its phrase score is the same
  mean; its `+ 1e-6` guard is not reproduced, a chunk without tokens is not scored at all), or the max;
- `box_score` = max over the prompt's tokens (special tokens and separators included, as in the
  official GroundingDINO `predict`);
- a box scoring >= floor for no chunk, but >= floor overall, is kept once with chunk -1 (unassigned) and
  the max over the tokens of no chunk as score.

GLIP's final score also multiplies in ATSS's centerness (`sqrt(cls * centerness)`), which GroundingDINO
does not have: the same 0.65 does not select the same pairs with both; `grit calibrate` measures it.
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


def as_positive_map(token_chunk: np.ndarray, n_chunks: int) -> np.ndarray:
    """A token -> chunk vector (-1: no chunk) as the (n_chunks, tokens) positive map; a 2-D map as it is."""
    token_chunk = np.asarray(token_chunk)
    if token_chunk.ndim == 2:
        return token_chunk.astype(bool)
    out = np.zeros((n_chunks, len(token_chunk)), bool)
    mapped = np.flatnonzero(token_chunk >= 0)
    out[token_chunk[mapped], mapped] = True
    return out


def chunk_scores(probs: np.ndarray, pos_map: np.ndarray, rule: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """(Q, T) token probabilities and a (C, T) positive map -> ((Q, C) each chunk's score by `rule`, "mean"
    or "max" over its tokens; (Q,) max over the tokens of no chunk). A chunk without tokens scores 0."""
    probs = np.asarray(probs, np.float32)
    pos_map = np.asarray(pos_map, bool)
    q = probs.shape[0]
    counts = pos_map.sum(1)
    if rule == "mean":
        weights = pos_map / np.maximum(counts, 1)[:, None]
        per_chunk = (probs.astype(np.float64) @ weights.T).astype(np.float32)
    elif rule == "max":
        per_chunk = np.zeros((q, len(pos_map)), np.float32)
        for j in np.flatnonzero(counts):
            per_chunk[:, j] = probs[:, pos_map[j]].max(1)
    else:
        raise ValueError(f"chunk score rule must be 'mean' or 'max', not {rule!r}")
    unmapped = ~pos_map.any(0)
    rest = probs[:, unmapped].max(1) if unmapped.any() else np.zeros(q, np.float32)
    return per_chunk, rest


def entries_from_probs(probs: np.ndarray, token_chunk: np.ndarray, xyxy: np.ndarray, n_chunks: int,
                       floor: float, first_box: int = 0, rule: str = "mean") -> tuple[np.ndarray, ...]:
    """One pass's (Q, T) probabilities -> raw entries (box, chunk, xyxy, score, box_score) with
    score >= floor. `token_chunk` is the pass's (n_chunks, T) positive map, or a (T,) token -> chunk
    vector (-1: no chunk). Boxes are numbered `first_box + query index` so several passes never collide;
    boxes of zero area (after clipping to the image) are dropped."""
    probs = np.asarray(probs, np.float32)
    xyxy = np.asarray(xyxy, np.float64).reshape(-1, 4)
    pos_map = as_positive_map(token_chunk, n_chunks)
    floor32 = np.float32(floor)
    box_score = probs.max(1) if probs.shape[1] else np.zeros(len(probs), np.float32)
    live = (box_score >= floor32) & (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    queries = np.flatnonzero(live)
    if len(queries) == 0:
        return _empty()
    per_chunk, rest = chunk_scores(probs[queries], pos_map, rule)
    in_pass = pos_map.any(1)  # chunks with tokens in this pass; the others were not asked
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
