"""The numbers behind the report's plots, computed with pyarrow compute over stored stage outputs.

The kept-fraction curve answers "what share of captions would survive `select` at threshold t?" from the
stored `detect` candidates alone, so a threshold can be chosen without re-running the detector: a caption
survives `select` exactly when one of its valid chunk-box pairs scores above t (and passes the area
filter), because NMS always keeps the best-ranked pair, under every `select.nms_scope` (the paper's `pair`
rule, `box`, `chunk`) and `nms_iou`. So one pass of the real `select` stage with the threshold at 0 and
NMS off gives each row's best pair score, and the whole curve follows from those. (How many *pairs* a
caption keeps does depend on the NMS rule; `grit inspect --stage detect` shows each candidate's fate.)

The report reads stage outputs one shard at a time, so every plot's numbers are running sums over shards
(`ScoreHistogram`, `KeptCounts`, `CountDistribution`): memory stays that of one shard however many are read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.select import SelectConfig, SelectStage

# Thresholds at which the kept-fraction curve is evaluated: 0.00, 0.01, ..., 1.00.
SCORE_GRID: tuple[float, ...] = tuple(round(i / 100, 2) for i in range(101))


def _flat_candidates(detect: pa.Table) -> pa.Table:
    """One row per candidate: `row` (index into `detect`), chunk, score and corners; box-only
    candidates (chunk -1, tokens that map to no chunk) are dropped, as `select` drops them."""
    col = detect.column("candidates")
    flat = pc.list_flatten(col)
    t = pa.table({"row": pc.list_parent_indices(col),
                  **{n: pc.struct_field(flat, n) for n in ("chunk", "score", "x1", "y1", "x2", "y2")}})
    return t.filter(pc.greater_equal(t["chunk"], 0))


def candidate_scores(detect: pa.Table) -> np.ndarray:
    """Every chunk-box score the detector reported (before threshold and NMS)."""
    return _flat_candidates(detect)["score"].to_numpy().astype(np.float64)


def run_select_config(select_section: dict) -> SelectConfig:
    """The `select` config a run recorded (its run.yaml section). A run made by select v1 may say
    `nms_scope: image`, which is v1's rule under its v2 name `box`."""
    known = {k: v for k, v in select_section.items() if k in SelectConfig.model_fields}
    if known.get("nms_scope") == "image":
        known["nms_scope"] = "box"
    return SelectConfig(**known)


def permissive_select_config(select_section: dict) -> SelectConfig:
    """The run's `select` config with the threshold at 0 and NMS and the pair cap off: every pair that
    select's validity and area checks let through survives, so its best score decides the row's fate."""
    return run_select_config(select_section).model_copy(update={"min_score": 0.0, "nms_iou": 1.0, "max_pairs": None})


def best_pair_scores(table: pa.Table, select_section: dict) -> np.ndarray:
    """Per row of `table` (key, candidates, and chunks when available, as the engine gives `select`), the
    best score of a pair that the real `select` stage would consider; -inf when none. The row is kept at
    threshold t iff this is > t: NMS and max_pairs never remove a row's best pair."""
    result = SelectStage(permissive_select_config(select_section)).process_batch(table)
    pairs = result.output.column("pairs")
    best = np.full(table.num_rows, -np.inf)
    if result.output.num_rows:
        flat = pa.table({"row": pc.list_parent_indices(pairs),
                         "score": pc.struct_field(pc.list_flatten(pairs), "score")})
        g = flat.group_by("row").aggregate([("score", "max")])
        row_of_key = {k: i for i, k in enumerate(table.column("key").to_pylist())}
        out_keys = result.output.column("key").to_pylist()
        rows = np.asarray([row_of_key[out_keys[r]] for r in g["row"].to_pylist()], dtype=np.int64)
        best[rows] = g["score_max"].to_numpy().astype(np.float64)
    return best


# Bins of the score histogram: 40 over [0, 1] (the last one closed, as numpy's).
HISTOGRAM_EDGES: np.ndarray = np.linspace(0, 1, 41)


class ScoreHistogram:
    """Running histogram of chunk-box scores over `HISTOGRAM_EDGES`, with how many are above `threshold`
    (compared in float32, as `select` compares the stored float32 scores)."""

    def __init__(self, threshold: float):
        self.threshold = float(threshold)
        self.counts = np.zeros(len(HISTOGRAM_EDGES) - 1, dtype=np.int64)
        self.n = 0
        self.above = 0

    def add(self, scores: np.ndarray) -> None:
        self.counts += np.histogram(scores, bins=HISTOGRAM_EDGES)[0]
        self.n += int(scores.size)
        self.above += int((scores.astype(np.float32) > np.float32(self.threshold)).sum())


class KeptCounts:
    """Running count, per threshold, of rows whose best pair score is above it (`select` keeps a row iff
    score > min_score; compared in float32 like a stage working on the Arrow column)."""

    def __init__(self, thresholds: Sequence[float]):
        self.thresholds = tuple(float(t) for t in thresholds)
        self._t32 = np.asarray(self.thresholds, dtype=np.float32)[:, None]
        self.kept = np.zeros(len(self.thresholds), dtype=np.int64)
        self.rows = 0

    def add(self, best_scores: np.ndarray) -> None:
        self.kept += (best_scores.astype(np.float32)[None, :] > self._t32).sum(axis=1)
        self.rows += int(best_scores.size)

    def count(self, threshold: float) -> int:
        return int(self.kept[self.thresholds.index(float(threshold))])

    def share(self, threshold: float) -> float:
        return self.count(threshold) / self.rows if self.rows else 0.0


class CountDistribution:
    """Running frequencies of a per-row count (chunks per caption, boxes per caption, words per expression)."""

    def __init__(self) -> None:
        self._freq: Counter[int] = Counter()

    def add(self, counts: np.ndarray) -> None:
        values, freq = np.unique(counts, return_counts=True)
        self._freq.update(dict(zip(values.tolist(), freq.tolist(), strict=True)))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(values ascending, how many rows have each)."""
        values = sorted(self._freq)
        return np.asarray(values, dtype=np.int64), np.asarray([self._freq[v] for v in values], dtype=np.int64)


def list_lengths(table: pa.Table, column: str) -> np.ndarray:
    """Number of entries of a list column per row (chunks per caption, boxes per caption)."""
    return pc.list_value_length(table.column(column)).to_numpy(zero_copy_only=False).astype(np.int64)


def expression_word_counts(grit: pa.Table) -> np.ndarray:
    """Words per kept referring expression (`ref_exps` spans sliced out of `caption`)."""
    counts = []
    for caption, exps in zip(grit.column("caption").to_pylist(), grit.column("ref_exps").to_pylist(), strict=True):
        seen = set()
        for e in exps or []:
            span = (int(e[0]), int(e[1]))
            if span in seen:  # one expression with several boxes is listed once per box
                continue
            seen.add(span)
            counts.append(len(caption[span[0]:span[1]].split()))
    return np.asarray(counts, dtype=np.int64)
