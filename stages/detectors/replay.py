"""`replay` backend: detections read instead of computed — the offline demo, GRIT-20M re-processing, tests.

Two modes:

- `file`: a Parquet file or directory (local or fsspec URL) in the *replay schema*, one row per
  (box, chunk) detection — `REPLAY_SCHEMA_DOC` below. Loaded once per actor (in memory; split very
  large files per source shard). Rows for keys not in the batch are ignored.
- `grit20m`: no file; each row's own `src_noun_chunks` (GRIT-20M's released `noun_chunks`, renamed by
  ingest) become the candidates. Entry `[start, end, x1, y1, x2, y2, score]` is assigned to the row's
  chunk with the same (start, end) span (the chunks stage in that mode takes its spans from the same
  column), or -1 when no chunk has that span.

Entries sharing a `box` id (or, without that column / in grit20m mode, identical corners) are one box;
its `box_score` is the best score among them.

Bad replayed entries are dropped, never passed on (select also guards): a box or score that fails
`schemas.boxes.check_boxes` (a non-finite corner, a corner outside [0, 1] beyond its float-noise
tolerance -- corners within it are clipped --, an inverted or empty box, a score that is not a number in
[0, 1]), a chunk index outside [-1, number of chunks), a malformed grit20m entry. A row whose entries were all dropped is rejected `bad_detection` with counts per problem; a row
whose key has no entry at all is rejected `no_detection` ("key not in replay file").
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.boxes import check_boxes
from schemas.rows import RejectReason
from stages.detectors.base import ChunkPrompt, Detections, ImageInput, finalize

log = logging.getLogger(__name__)

REPLAY_SCHEMA_DOC = """\
key     string   required  the row's key
x1..y2  double   required  normalized xyxy corners of the box in the original image, in [0, 1]
score   float    required  the chunk's score for the box, in [0, 1]
chunk   int32    one of    index into the row's `chunks` (-1: unassigned)
start   int32     these    char span of the chunk in the caption (matched to the row's chunks;
end     int32     two      -1 when no chunk has that span)
box     int32    optional  entries with the same box id (>= 0) are one box; without one (null):
                           entries with identical corners are one box
"""
REPLAY_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("x1", pa.float64(), nullable=False),
    pa.field("y1", pa.float64(), nullable=False),
    pa.field("x2", pa.float64(), nullable=False),
    pa.field("y2", pa.float64(), nullable=False),
    pa.field("score", pa.float32(), nullable=False),
    pa.field("chunk", pa.int32()),
    pa.field("start", pa.int32()),
    pa.field("end", pa.int32()),
    pa.field("box", pa.int32()),
])
CORNERS = ("x1", "y1", "x2", "y2")


def check_entries(xyxy: np.ndarray, score: np.ndarray, chunk: np.ndarray,
                  n_chunks: int) -> tuple[np.ndarray, np.ndarray, Counter]:
    """Which replayed entries are usable: (keep mask, corners clipped to [0, 1], problems counted, each
    entry under its first problem: the `schemas.boxes.BOX_PROBLEMS` names, then chunk_out_of_range)."""
    checked = check_boxes(xyxy, score)
    chunk = np.asarray(chunk, np.int64)
    problems: Counter = Counter()
    bad = np.zeros(len(chunk), bool)
    masks = {**checked.problems, "chunk_out_of_range": (chunk < -1) | (chunk >= n_chunks)}
    for name, mask in masks.items():
        new = mask & ~bad
        if new.any():
            problems[name] += int(new.sum())
        bad |= mask
    return ~bad, checked.clipped, problems


def box_ids_from_corners(xyxy: np.ndarray) -> np.ndarray:
    """Entries with identical corners share a box id (ids in order of first appearance)."""
    _, first, inverse = np.unique(np.asarray(xyxy).reshape(-1, 4), axis=0, return_index=True,
                                  return_inverse=True)
    rank = np.argsort(np.argsort(first))
    return rank[inverse.reshape(-1)]


class ReplayDetector:
    needs_pixels = False

    def __init__(self, *, path: str | None = None, mode: str = "file", floor: float = 0.1,
                 max_candidates: int = 100, chunk_candidates: int = 0):
        if mode not in ("file", "grit20m"):
            raise ValueError(f"replay mode must be 'file' or 'grit20m', not {mode!r}")
        if mode == "file" and not path:
            raise ValueError("replay backend in 'file' mode needs detect.replay_path")
        self.mode = mode
        self.floor = floor
        self.max_candidates = max_candidates
        self.chunk_candidates = chunk_candidates
        self.dropped: Counter = Counter()  # entries dropped as unusable, by problem (all batches)
        if mode == "file":
            self._load(path)

    # --- file mode -------------------------------------------------------------------------------
    def _load(self, path: str) -> None:
        fs, p = fsspec.core.url_to_fs(path)
        table = pq.read_table(p, filesystem=fs)
        names = set(table.column_names)
        missing = [c for c in ("key", *CORNERS, "score") if c not in names]
        if missing or not ("chunk" in names or {"start", "end"} <= names):
            raise ValueError(f"{path}: not a replay file (missing {missing or ['chunk or start/end']}); "
                             f"expected columns:\n{REPLAY_SCHEMA_DOC}")
        self.path = path

        def floats(name: str) -> np.ndarray:
            return pc.cast(table[name], pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)

        def ints(name: str, missing_value: int) -> np.ndarray:
            col = pc.fill_null(pc.cast(table[name], pa.int64()), missing_value)
            return col.to_numpy(zero_copy_only=False).astype(np.int64)

        self._xyxy = np.stack([floats(c) for c in CORNERS], 1)
        self._score = floats("score")
        self._chunk = ints("chunk", -2) if "chunk" in names else None
        self._span = np.stack([ints("start", -1), ints("end", -1)], 1) if self._chunk is None else None
        self._box = ints("box", -1) if "box" in names else None
        self._rows: dict[str, list[int]] = {}
        for i, key in enumerate(table["key"].to_pylist()):
            self._rows.setdefault(key, []).append(i)

    def _file_entries(self, key: str, prompt: ChunkPrompt) -> tuple | None:
        rows = self._rows.get(key)
        if rows is None:
            return None
        idx = np.asarray(rows)
        if self._chunk is not None:
            chunk = self._chunk[idx]
        else:
            chunk = _chunks_by_span(self._span[idx], prompt.spans)
        box = self._box[idx] if self._box is not None else None
        return self._xyxy[idx], self._score[idx], chunk, box

    # --- grit20m mode ----------------------------------------------------------------------------
    @staticmethod
    def _grit_entries(image: ImageInput, prompt: ChunkPrompt) -> tuple | None:
        entries = image.source_boxes or []
        if not entries:
            return None
        ok = [e is not None and len(e) == 7 for e in entries]
        arr = np.array([[np.nan if v is None else float(v) for v in e] if good else [np.nan] * 7
                        for e, good in zip(entries, ok, strict=True)], np.float64).reshape(-1, 7)
        spans = np.where(np.isfinite(arr[:, :2]), arr[:, :2], -1).astype(np.int64)
        chunk = _chunks_by_span(spans, prompt.spans)
        chunk[~np.asarray(ok)] = -2  # malformed entry: dropped by check_entries as chunk_out_of_range
        return arr[:, 2:6], arr[:, 6], chunk, None

    def detect(self, images: Sequence[ImageInput], prompts: Sequence[ChunkPrompt]) -> list[Detections]:
        out = []
        for image, prompt in zip(images, prompts, strict=True):
            found = (self._file_entries(image.key, prompt) if self.mode == "file"
                     else self._grit_entries(image, prompt))
            if found is None:
                out.append(Detections.empty(RejectReason.NO_DETECTION,
                                            "key not in replay file" if self.mode == "file"
                                            else "row has no src_noun_chunks boxes"))
                continue
            xyxy, score, chunk, box = found
            keep, xyxy, problems = check_entries(xyxy, score, chunk, len(prompt.phrases))
            self.dropped.update(problems)
            if not keep.any():
                detail = ", ".join(f"{n} {name}" for name, n in sorted(problems.items()))
                out.append(Detections.empty(RejectReason.BAD_DETECTION,
                                            f"all {len(score)} replayed boxes unusable: {detail}"))
                continue
            if problems:
                log.debug("%s: dropped replayed boxes %s", image.key, dict(problems))
            xyxy, score, chunk = xyxy[keep], np.asarray(score)[keep], np.asarray(chunk)[keep]
            box = _box_ids(None if box is None else np.asarray(box)[keep], xyxy)
            box_score = _best_per_box(box, score)
            out.append(finalize(box, chunk, xyxy, score, box_score, floor=self.floor,
                                max_candidates=self.max_candidates, chunk_candidates=self.chunk_candidates,
                                what="replayed box"))
        return out


def _chunks_by_span(spans: np.ndarray, chunk_spans: Sequence[tuple[int, int]]) -> np.ndarray:
    lookup = {(int(s), int(e)): i for i, (s, e) in reversed(list(enumerate(chunk_spans)))}
    return np.array([lookup.get((int(s), int(e)), -1) for s, e in np.asarray(spans).reshape(-1, 2)], np.int64)


def _box_ids(given: np.ndarray | None, xyxy: np.ndarray) -> np.ndarray:
    """The file's box ids where given (>= 0); entries without one are grouped by identical corners, under
    ids past the given ones."""
    if given is None:
        return box_ids_from_corners(xyxy)
    missing = given < 0
    if not missing.any():
        return given
    out = given.copy()
    out[missing] = given.max(initial=-1) + 1 + box_ids_from_corners(xyxy[missing])
    return out


def _best_per_box(box: np.ndarray, score: np.ndarray) -> np.ndarray:
    ids, inverse = np.unique(box, return_inverse=True)
    best = np.full(len(ids), -np.inf)
    np.maximum.at(best, inverse, np.asarray(score, np.float64))
    return best[inverse].astype(np.float32)
