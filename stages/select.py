"""Stage 4, `select`: turn the detector's raw candidates into the chunk-box pairs that ground a caption.

Input: `key` and `candidates` (list of `schemas.tables.CANDIDATE_TYPE`: box id, chunk index or -1,
normalized x1..y2, the chunk's score, the box's best score), plus `chunks` when the engine passes it on.
Output: `schemas.tables.SELECT_SCHEMA` (`key`, `pairs`). This is the step "regenerate with new
thresholds" re-runs on CPU, so it works on whole batches: one vectorized pass over all candidates of the
batch, and torchvision's `batched_nms` over blocks of images rather than one call per image.

Per image, in order:
1. Malformed candidates are dropped: a box that fails `schemas.boxes.check_boxes` (a non-finite corner,
   a corner outside [0, 1] beyond `schemas.boxes.BOX_TOLERANCE`, an inverted or empty box, a score outside
   [0, 1]), a negative box id, a chunk below -1, or (when the batch has `chunks`) a chunk index past the
   row's chunk list. Corners within the tolerance are clipped into [0, 1]. If every candidate of a row is
   malformed the row is rejected `bad_detection`; a null candidate list is `bad_detection` too.
2. Unassigned candidates (chunk -1: the box's tokens map to no chunk) are dropped.
3. Pairs with score <= min_score are dropped (compared in float32, the type scores are stored in, so a
   score that prints as 0.65 is "equal" to min_score 0.65 and dropped).
4. With max_box_area, pairs whose box covers more than that fraction of the image are dropped (before NMS,
   so that a background-sized box cannot suppress the objects inside it).
5. NMS (`nms_scope`, below), then with max_pairs the highest-scoring pairs are kept.
A row left without pairs is rejected `no_box`, with a detail that counts what removed its candidates.

NMS, `nms_scope: pair` (the default): the paper's rule (Kosmos-2 section 2: "Non-maximum suppression
algorithm is applied to remove bounding boxes that have a high overlap with others, even if they are not
for the same noun chunk"). Class-agnostic greedy NMS over all (box, chunk) pairs of an image, ranked by
pair score: a pair is removed when its box overlaps a better-ranked surviving pair's box with IoU >
nms_iou, whatever the two chunks. The same box scored for two chunks overlaps itself with IoU 1, so a box
survives for its best chunk only -- as with GLIP, where every (box, phrase) is its own detection.
`nms_scope: box` is select v1's rule, for detectors whose one box legitimately answers several phrases
("a man", "a person"): NMS over the image's distinct boxes (by `box` id), each ranked by its best kept
pair; a surviving box keeps every chunk it scored above min_score for, a suppressed box loses them all.
`nms_scope: chunk` runs NMS separately within each chunk's pairs (GLIP's per-class NMS).

The default `nms_iou` 0.7 is chosen from the release: the published GRIT-20M sample row keeps two boxes of
two chunks with IoU 0.688, so if the release applied class-agnostic NMS its threshold was above 0.69; 0.7
is the lowest round threshold that keeps that row and still removes the duplicate boxes the paper's rule
is for. nms_iou >= 1.0 disables NMS.

Ties are broken by (score desc, x1, y1, x2, y2, box id, chunk), so the output never depends on the
candidates' order: of two pairs with the same score, the one whose box comes first in that order wins, and
of one box's equal-scored pairs, the lower chunk index. Pairs of a row are sorted by chunk, then score
descending, then coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from schemas.boxes import BOX_PROBLEMS, BoxCheck, check_boxes
from schemas.rows import RejectReason
from schemas.tables import PAIR_TYPE, SELECT_SCHEMA
from stages.base import Execution, Stage, StageConfig, StageResult
from stages.list_columns import ListEntries

# NMS runs over blocks of whole images of at most this many boxes: torchvision's batched_nms offsets the
# boxes of each image apart (one nms call per block) up to 1,000 boxes on CPU and loops per image above
# that; its nms is quadratic in the block, and each call has a fixed cost. 512 measured fastest of
# 128-1,000 on 20k rows x 10 candidates (bench/select_throughput.py).
NMS_BLOCK = 512


class SelectConfig(StageConfig):
    min_score: float = Field(
        0.65, ge=0.0, le=1.0,
        description="Keep chunk-box pairs with score strictly above this (the paper: confidence > 0.65).")
    nms_iou: float = Field(
        0.7, gt=0.0,
        description="NMS IoU threshold: a pair whose box overlaps a better pair's box with IoU > nms_iou is "
        "removed. The paper does not state its value; the published GRIT-20M row keeps two boxes of two "
        "chunks with IoU 0.688, so 0.7 keeps it while removing duplicates. >= 1.0 disables NMS.")
    nms_scope: Literal["pair", "box", "chunk"] = Field(
        "pair", description="pair: class-agnostic NMS over all (box, chunk) pairs of an image, so a box "
        "survives for its best chunk only (the paper); box: NMS over distinct boxes, a surviving box keeps "
        "every chunk it scored above min_score (select v1, for detectors whose one box answers several "
        "phrases); chunk: NMS within each chunk's boxes only.")
    max_box_area: float | None = Field(
        None, gt=0.0, le=1.0,
        description="Drop boxes covering more than this fraction of the image (None = off).")
    max_pairs: int | None = Field(
        None, ge=1, description="Keep at most this many pairs per caption, the highest-scoring (None = all).")

    @field_validator("nms_scope", mode="before")
    @classmethod
    def _renamed_scope(cls, value):
        if value == "image":
            raise ValueError("nms_scope 'image' is gone since select v2: 'pair' is the paper's class-agnostic "
                             "NMS (a box survives for its best chunk only; the default), 'box' is what 'image' "
                             "did (a surviving box keeps all of its chunks)")
        return value


class SelectStage(Stage[SelectConfig]):
    name: ClassVar[str] = "select"
    version: ClassVar[int] = 2  # v2: nms_scope pair (the paper's rule) and nms_iou 0.7 by default; one box check
    Config: ClassVar[type[StageConfig]] = SelectConfig
    Execution: ClassVar[type[Execution]] = Execution
    output_schema: ClassVar[pa.Schema] = SELECT_SCHEMA

    def process_batch(self, table: pa.Table) -> StageResult:
        c = _Candidates.from_table(table)
        n = table.num_rows
        steps = self._steps(c)
        kept = steps.kept[_order(_combine(c.row[steps.kept], c.chunk[steps.kept]), c.score[steps.kept],
                                 [c.x1[steps.kept], c.y1[steps.kept], c.x2[steps.kept], c.y2[steps.kept],
                                  c.box[steps.kept]])]

        pairs_per_row = np.bincount(c.row[kept], minlength=n)
        rejects = self.rejects()
        keys = table["key"].to_pylist()
        counts = _RowCounts(c, n, steps.valid, steps.assigned, steps.above, steps.area_ok)
        for i in np.flatnonzero(pairs_per_row == 0):
            reason, detail = counts.explain(int(i), self.config)
            rejects.add(keys[i], reason, detail)
        return StageResult(_pairs_table(table, c, kept, pairs_per_row), rejects.table())

    def explain(self, table: pa.Table) -> list[list[CandidateFate]]:
        """What this stage does with each candidate of each row of `table` (the stage's input), in input
        order: for `grit inspect`, which shows detector candidates with the rule in force. A candidate that
        NMS removed names the better-ranked surviving pair whose box overlapped it."""
        c = _Candidates.from_table(table)
        steps = self._steps(c)
        fate = np.full(len(c.row), "malformed", dtype=object)
        fate[steps.valid & (c.chunk < 0)] = "unassigned"
        fate[steps.assigned & ~steps.above] = "below_min_score"
        fate[steps.above & ~steps.area_ok] = "over_max_box_area"
        fate[steps.area_ok] = "duplicate"
        fate[steps.ranked] = "nms"
        fate[steps.after_nms] = "max_pairs"
        fate[steps.kept] = "kept"
        by = _suppressors(c, steps, self.config) if self.config.nms_iou < 1.0 else {}
        out = []
        start = 0
        for i in range(table.num_rows):
            end = int(np.searchsorted(c.row, i, side="right"))
            row = []
            for j in range(start, end):
                detail = c.box_check.describe(j) if fate[j] == "malformed" else ""
                sup = by.get(j)
                row.append(CandidateFate(str(fate[j]), detail, *(sup if sup else (None, None, None))))
            out.append(row)
            start = end
        return out

    def _steps(self, c: _Candidates) -> _Steps:
        cfg = self.config
        valid = c.valid()
        assigned = valid & (c.chunk >= 0)
        above = assigned & (c.score > np.float32(cfg.min_score))
        area_ok = above
        if cfg.max_box_area is not None:
            area_ok = above & ((c.x2 - c.x1) * (c.y2 - c.y1) <= cfg.max_box_area)
        ranked = _dedupe_pairs(c, np.flatnonzero(area_ok))  # candidate indices, sorted by row then rank
        after_nms = _nms(c, ranked, cfg.nms_iou, cfg.nms_scope) if cfg.nms_iou < 1.0 else ranked
        kept = _cap_per_row(c, after_nms, cfg.max_pairs) if cfg.max_pairs is not None else after_nms
        return _Steps(valid, assigned, above, area_ok, ranked, after_nms, kept)


@dataclass(frozen=True)
class CandidateFate:
    """What `select` does with one candidate. `status`: kept, malformed (`detail` says how), unassigned
    (chunk -1), below_min_score, over_max_box_area, duplicate (a better entry for the same box and chunk),
    nms (removed: `by_box`/`by_chunk` is the surviving pair whose box overlapped it with IoU `iou`),
    max_pairs."""

    status: str
    detail: str = ""
    by_box: int | None = None
    by_chunk: int | None = None
    iou: float | None = None


@dataclass
class _Steps:
    """Masks and candidate indices after each step of `select` (indices in rank order)."""

    valid: np.ndarray
    assigned: np.ndarray
    above: np.ndarray
    area_ok: np.ndarray
    ranked: np.ndarray  # passed every filter, repeated (row, box, chunk) entries reduced to the best
    after_nms: np.ndarray
    kept: np.ndarray


def _suppressors(c: _Candidates, steps: _Steps, cfg: SelectConfig) -> dict[int, tuple[int, int, float]]:
    """For each candidate NMS removed: (box, chunk, IoU) of the pair that removed it -- in greedy NMS, the
    best-ranked surviving pair of its NMS group whose box overlaps it with IoU > nms_iou."""
    import torch  # only when asked, like NMS itself
    from torchvision.ops import box_iou

    survivors = steps.after_nms
    corners = np.stack([c.x1, c.y1, c.x2, c.y2], axis=1)
    position = np.full(len(c.row), -1)
    position[steps.ranked] = np.arange(len(steps.ranked))
    out = {}
    for j in np.setdiff1d(steps.ranked, survivors):
        same = survivors[(c.row[survivors] == c.row[j]) & (position[survivors] < position[j])]
        if cfg.nms_scope == "chunk":
            same = same[c.chunk[same] == c.chunk[j]]
        if len(same) == 0:
            continue
        same = same[np.argsort(position[same])]
        ious = box_iou(torch.from_numpy(corners[[j]]), torch.from_numpy(corners[same]))[0].numpy()
        hit = np.flatnonzero(ious > cfg.nms_iou)
        if len(hit):
            k = same[hit[0]]
            out[int(j)] = (int(c.box[k]), int(c.chunk[k]), float(ious[hit[0]]))
    return out


@dataclass
class _Candidates:
    """All candidates of a batch as flat numpy columns; `row` is the input row each belongs to."""

    row: np.ndarray
    box: np.ndarray
    chunk: np.ndarray
    x1: np.ndarray  # corners clipped by `box_check` (within BOX_TOLERANCE of [0, 1]; NaN stays NaN)
    y1: np.ndarray
    x2: np.ndarray
    y2: np.ndarray
    score: np.ndarray  # float32, as stored
    null_list: np.ndarray  # per input row: candidates is null
    n_chunks: np.ndarray | None  # per input row, when the batch has `chunks`
    box_check: BoxCheck  # of the corners as given and the scores

    @classmethod
    def from_table(cls, table: pa.Table) -> _Candidates:
        cands = ListEntries.of(table["candidates"])
        score = cands.field("score").astype(np.float32)
        # one box check, of the corners as given; the candidates carry its clipped corners from here on
        box_check = check_boxes(np.stack([cands.field(k) for k in ("x1", "y1", "x2", "y2")], axis=1), score)
        x1, y1, x2, y2 = (np.ascontiguousarray(col) for col in box_check.clipped.T)
        n_chunks = None
        if "chunks" in table.column_names:
            n_chunks = _filled(pc.list_value_length(table["chunks"]), 0).astype(np.int64)
        return cls(
            row=cands.row,
            box=cands.field("box", -1.0).astype(np.int64),
            chunk=cands.field("chunk", -2.0).astype(np.int64),
            x1=x1, y1=y1, x2=x2, y2=y2,
            score=score,
            null_list=_filled(pc.is_null(cands.lists), True).astype(bool),
            n_chunks=n_chunks,
            box_check=box_check,
        )

    @cached_property
    def index_problems(self) -> dict[str, np.ndarray]:
        """The checks of box id and chunk index, each as a boolean mask over candidates (True = problem)."""
        out = {"negative box id": self.box < 0, "chunk index below -1": self.chunk < -1}
        if self.n_chunks is not None:
            out["chunk index past the row's chunks"] = self.chunk >= self.n_chunks[self.row]
        return out

    @cached_property
    def problems(self) -> dict[str, np.ndarray]:
        """Each malformation check as a boolean mask over candidates (True = this problem), worded as in
        `schemas.boxes.BOX_PROBLEMS` for the box and score checks."""
        return {**{BOX_PROBLEMS[name]: mask for name, mask in self.box_check.problems.items()},
                **self.index_problems}

    def valid(self) -> np.ndarray:
        """(n,) bool: the candidate has none of `problems`."""
        ok = self.box_check.ok.copy()
        for mask in self.index_problems.values():
            ok &= ~mask
        return ok

    def rank_order(self, idx: np.ndarray) -> np.ndarray:
        """`idx` sorted by row, then score desc, then corners, box id and chunk (the tie-break rule)."""
        return idx[_order(self.row[idx], self.score[idx],
                          [self.x1[idx], self.y1[idx], self.x2[idx], self.y2[idx], self.box[idx], self.chunk[idx]])]


def _dedupe_pairs(c: _Candidates, idx: np.ndarray) -> np.ndarray:
    """`idx` in rank order, with repeated (row, box, chunk) entries reduced to their best-ranked one."""
    ranked = c.rank_order(idx)
    _, first = np.unique(_combine(c.row[ranked], c.box[ranked], c.chunk[ranked]), return_index=True)
    return ranked[np.sort(first)]


def _nms(c: _Candidates, ranked: np.ndarray, iou: float, scope: str) -> np.ndarray:
    """The candidates of `ranked` (rank order) that survive NMS in the given scope, still in rank order."""
    rank = np.empty(len(c.row), dtype=np.float64)
    rank[ranked] = -np.arange(len(ranked), dtype=np.float64)  # NMS "score": unique, higher = better
    if scope == "pair":
        # every (box, chunk) pair is an NMS item, grouped by image; rows ascend in rank order
        items, group = ranked, c.row[ranked]
    elif scope == "box":
        # one NMS item per distinct (row, box): its best-ranked pair, which comes first in `ranked`
        box_id = _combine(c.row[ranked], c.box[ranked])
        _, first = np.unique(box_id, return_index=True)
        first = np.sort(first)
        items, group = ranked[first], c.row[ranked[first]]  # rows ascend in rank order: groups contiguous
    else:
        group = _combine(c.row[ranked], c.chunk[ranked])
        order = np.argsort(group, kind="stable")  # contiguous groups, rank order inside each
        items, group = ranked[order], group[order]
    boxes = np.stack([c.x1[items], c.y1[items], c.x2[items], c.y2[items]], axis=1)
    survivors = _batched_nms_blocks(boxes, rank[items], group, iou)
    if scope == "pair":
        return ranked[survivors]  # items are `ranked` itself; survivors come sorted
    if scope == "box":
        return ranked[np.isin(box_id, box_id[first[survivors]])]
    return ranked[np.isin(ranked, items[survivors])]


def _batched_nms_blocks(boxes: np.ndarray, scores: np.ndarray, group: np.ndarray, iou: float) -> np.ndarray:
    """Indices of `boxes` kept by per-group NMS. `group` must be non-decreasing (groups contiguous).
    Runs torchvision's batched_nms on blocks of whole groups of at most NMS_BLOCK boxes, in float64 so
    that the per-group coordinate offsets cannot cost precision."""
    if len(boxes) == 0:
        return np.empty(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    ends = np.r_[starts[1:], len(boxes)]
    keep: list[np.ndarray] = []
    block_start = 0
    for g_start, g_end in zip(starts, ends, strict=True):
        if g_end - block_start > NMS_BLOCK and g_start > block_start:
            keep.append(_nms_block(boxes, scores, group, block_start, g_start, iou))
            block_start = g_start
    keep.append(_nms_block(boxes, scores, group, block_start, len(boxes), iou))
    return np.sort(np.concatenate(keep))


def _nms_block(boxes, scores, group, start: int, end: int, iou: float) -> np.ndarray:
    import torch  # here, not at module level: the driver plans runs with this module and needs no torch
    from torchvision.ops import batched_nms

    local = group[start:end] - group[start]
    kept = batched_nms(torch.from_numpy(np.ascontiguousarray(boxes[start:end])),
                       torch.from_numpy(np.ascontiguousarray(scores[start:end])),
                       torch.from_numpy(np.ascontiguousarray(local)), iou)
    return kept.numpy() + start


def _cap_per_row(c: _Candidates, ranked: np.ndarray, max_pairs: int) -> np.ndarray:
    """The first `max_pairs` candidates of each row of `ranked` (rank order: rows contiguous)."""
    rows = c.row[ranked]
    starts = np.r_[0, np.flatnonzero(rows[1:] != rows[:-1]) + 1]
    position = np.arange(len(ranked)) - np.repeat(starts, np.diff(np.r_[starts, len(ranked)]))
    return ranked[position < max_pairs]


def _combine(*cols: np.ndarray) -> np.ndarray:
    """One int64 per element ordering like the tuple of the integer `cols` (lexicographically)."""
    key = np.zeros(len(cols[0]), dtype=np.int64)
    if len(key) == 0:
        return key
    for col in cols:
        col = col.astype(np.int64) - col.min()
        span = int(col.max()) + 1
        if (int(key.max()) + 1) * span >= 2**62:  # would overflow: renumber both densely first
            key = np.unique(key, return_inverse=True)[1].ravel().astype(np.int64)
            col = np.unique(col, return_inverse=True)[1].ravel().astype(np.int64)
            span = int(col.max()) + 1
        key = key * span + col
    return key


def _order(major: np.ndarray, score: np.ndarray, ties: list[np.ndarray]) -> np.ndarray:
    """Permutation sorting by (major asc, score desc), then by `ties` in order among exact equals.

    One stable argsort of a packed uint64 (major in the high half, inverted float32 score bits in the
    low half) and a lexsort over the tied elements only: ties are rare, and lexsort over all float
    columns of a whole batch costs more than the rest of the stage."""
    major = major.astype(np.int64)
    if len(major) and int(major.max()) >= 2**32:
        major = np.unique(major, return_inverse=True)[1].ravel().astype(np.int64)
    # non-negative float32 bits order like the floats; `+ 0` turns -0.0 into 0.0
    desc = np.uint64(0xFFFFFFFF) - (score.astype(np.float32) + np.float32(0)).view(np.uint32).astype(np.uint64)
    packed = (major.astype(np.uint64) << np.uint64(32)) | desc
    order = np.argsort(packed, kind="stable")
    sorted_keys = packed[order]
    equal = sorted_keys[1:] == sorted_keys[:-1]
    if equal.any():
        tied = np.zeros(len(order), dtype=bool)
        tied[1:] |= equal
        tied[:-1] |= equal
        pos = np.flatnonzero(tied)
        sub = order[pos]
        order[pos] = sub[np.lexsort([t[sub] for t in reversed(ties)] + [sorted_keys[pos]])]
    return order


class _RowCounts:
    """Per-row counts of what removed candidates, for the detail of `no_box`/`bad_detection` rejects."""

    def __init__(self, c: _Candidates, n: int, valid, assigned, above, area_ok):
        def count(mask):
            return np.bincount(c.row[mask], minlength=n)

        self.c = c
        self.total = np.bincount(c.row, minlength=n)
        self.malformed = self.total - count(valid)
        self.unassigned = count(valid) - count(assigned)
        self.below = count(assigned) - count(above)
        self.too_big = count(above) - count(area_ok)
        self.best = np.full(n, -np.inf)
        np.maximum.at(self.best, c.row[assigned], c.score[assigned].astype(np.float64))

    def explain(self, i: int, cfg: SelectConfig) -> tuple[RejectReason, str]:
        total = int(self.total[i])
        if self.c.null_list[i]:
            return RejectReason.BAD_DETECTION, "candidates is null"
        if total == 0:
            return RejectReason.NO_BOX, "no candidates"
        if self.malformed[i] == total:
            return RejectReason.BAD_DETECTION, f"all {total} candidates malformed ({self._first_problem(i)})"
        parts = []
        if self.malformed[i]:
            parts.append(f"{self.malformed[i]} malformed")
        if self.unassigned[i]:
            parts.append(f"{self.unassigned[i]} unassigned (chunk -1)")
        if self.below[i]:
            parts.append(f"{self.below[i]} with score <= min_score {cfg.min_score} "
                         f"(best {self.best[i]:.4f})")
        if self.too_big[i]:
            parts.append(f"{self.too_big[i]} over max_box_area {cfg.max_box_area}")
        return RejectReason.NO_BOX, f"{total} candidates: " + ", ".join(parts)

    def _first_problem(self, i: int) -> str:
        j = int(np.searchsorted(self.c.row, i))  # candidates come grouped by row, rows ascending
        found = [name for name, mask in self.c.problems.items() if mask[j]]
        return f"first: box {self.c.box[j]} chunk {self.c.chunk[j]}: {', '.join(found)}"


def _pairs_table(table: pa.Table, c: _Candidates, kept: np.ndarray, pairs_per_row: np.ndarray) -> pa.Table:
    rows_out = np.flatnonzero(pairs_per_row > 0)
    offsets = np.r_[0, np.cumsum(pairs_per_row[rows_out])].astype(np.int32)
    values = pa.StructArray.from_arrays(
        [pa.array(c.chunk[kept].astype(np.int32)), pa.array(c.x1[kept]), pa.array(c.y1[kept]),
         pa.array(c.x2[kept]), pa.array(c.y2[kept]), pa.array(c.score[kept].astype(np.float32))],
        fields=list(PAIR_TYPE),
    )
    pairs = pa.ListArray.from_arrays(pa.array(offsets), values, type=pa.list_(PAIR_TYPE))
    keys = pc.take(table["key"], pa.array(rows_out, pa.int64())).cast(pa.string())
    return pa.Table.from_arrays([keys, pairs], schema=SELECT_SCHEMA)


def _filled(arr, fill) -> np.ndarray:
    return pc.fill_null(arr, fill).to_numpy(zero_copy_only=False)
