"""`grit calibrate RUN`: the `select.min_score` (and `select.nms_iou`) at which this run's detector selects
what GLIP selected in the released GRIT-20M.

The paper kept (noun chunk, box) pairs above 0.65 on GLIP's scale (`sqrt(cls x centerness)`, the mean over
a phrase's tokens). GroundingDINO has no centerness and OWLv2 scores on another scale altogether, so the
same 0.65 selects other pairs. This command measures it. Input: a run over rows of released GRIT-20M
(images fetched with `grit download`, any detector backend), read from its committed ingest, chunks and
detect outputs, and the released pairs of those rows: the run's own `src_noun_chunks` (what `grit
download` passes through from the GRIT-20M metadata), or `--release PATH`, the metadata itself, joined on
`--join` (`id` when both sides have it, else `url`). With `--release` each shard scans the metadata once,
keeping only its rows (a filter pushed into the Parquet scan; JSON Lines streamed): give it the files the
run's rows came from, not all of GRIT-20M.

Per source shard, in memory bounded by one shard (counts are summed over shards, never the rows):

1. The shard's candidates go through `select` itself (the run's select config) at min_score 0, once per
   nms_iou of the grid. Greedy NMS decides a pair from better-ranked pairs only, so the pairs kept at
   min_score t are exactly those kept at 0 that score above t: one select run gives every threshold.
2. A kept pair matches a released pair with the same chunk span and box IoU >= 0.5 (`--match-iou`), one to
   one, greedily by falling score; matching, too, is decided from better pairs only, so it holds at every
   threshold.
3. On a grid of thresholds t (`--step`; a pair is kept when its float32 score > t, as select keeps it):
   pairs kept and matched, precision, recall and F1 against the released pairs; captions kept (at least one
   pair) as a share of the released captions, all of which GLIP kept.
4. The recommendation is the (nms_iou, min_score) of highest F1 (ties: the middle of a plateau of
   thresholds, the nms_iou nearest the run's own). Its interval comes from a bootstrap over rows:
   `--replicates` replicates, each row weighted Poisson(1) by a hash of its key and the replicate number
   (streaming, independent of shard order, reproducible); the 2.5-97.5 percentiles of the replicates'
   best thresholds, widened by one grid step, the grid's resolution.

Rows are counted by what became of them, never dropped silently: compared; no released pairs (not in the
release, or an empty list); chunks differ (a released span is not among the run's chunks: the run's spaCy
chunked the caption differently, or ingest changed the caption); caption differs (`--release` only); not
detected (detect rejected the row for its image). Only compared rows enter the figures; rows detect
rejected as `no_detection` are compared (they keep nothing).

Output: a table on the terminal, `<run>/report/calibration.json` (every grid threshold for every nms_iou,
the row counts, the recommendation and its interval) and `<run>/report/calibration.png` (precision,
recall and F1 against min_score).
"""

from __future__ import annotations

import hashlib
import io
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
import typer

from grit_pipeline.commands.options import JsonOpt, RunArg
from grit_pipeline.errors import UserError

DEFAULT_NMS_IOUS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
PAPER_THRESHOLD = 0.65
RELEASED = "src_noun_chunks"
REPORT_JSON = "report/calibration.json"
REPORT_PNG = "report/calibration.png"
NO_DETECTION = "no_detection"
_POISSON1_CDF = np.cumsum([math.exp(-1) / math.factorial(k) for k in range(20)])


class CalibrationError(UserError, ValueError):
    """The run or the release cannot be calibrated as asked; the message says why and what to do. `code`
    (`exit_code`): the exit status (2: bad arguments or not a run; 1: a run with nothing to compare)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = self.exit_code = code


@dataclass(frozen=True)
class CalibrateOptions:
    release: str | None = None  # GRIT-20M metadata (Parquet or JSON Lines, file or folder); None: the run's own
    join: str | None = None  # column joining run rows to release rows; None: id, else url
    step: float = 0.001
    nms_ious: tuple[float, ...] = DEFAULT_NMS_IOUS
    match_iou: float = 0.5
    replicates: int = 200
    seed: int = 0
    storage_options: dict | None = None


@dataclass
class RowCounts:
    seen: int = 0
    compared: int = 0
    no_release: int = 0
    chunks_differ: int = 0
    caption_differs: int = 0
    not_detected: Counter = field(default_factory=Counter)  # detect's reject reason -> rows
    released_pairs: int = 0  # in compared rows
    malformed_released: int = 0  # released entries that are not [start, end, x1, y1, x2, y2, score]


class Tally:
    """Per-threshold counts of one nms_iou, summed over shards: the point estimate and each replicate."""

    def __init__(self, n_thresholds: int, replicates: int):
        t = n_thresholds
        self.kept = np.zeros(t, np.int64)
        self.matched = np.zeros(t, np.int64)
        self.captions = np.zeros(t, np.int64)
        self.boot_kept = np.zeros((replicates, t))
        self.boot_matched = np.zeros((replicates, t))

    def add(self, bins: np.ndarray, rows: np.ndarray, matched: np.ndarray, n_rows: int, weights: np.ndarray) -> None:
        """One shard's kept pairs: `bins[p]` = how many grid thresholds pair p's score is above, `rows[p]` its
        row (0..n_rows-1), `matched[p]` whether it matches a released pair; `weights` (replicates, n_rows)."""
        t = len(self.kept)
        self.kept += _above(np.bincount(bins, minlength=t + 1))
        self.matched += _above(np.bincount(bins[matched], minlength=t + 1))
        best = np.full(n_rows, -1)
        np.maximum.at(best, rows, bins)
        self.captions += _above(np.bincount(best[best >= 0], minlength=t + 1))
        for part in range(0, len(bins), 8192):  # bounded memory: (replicates x 8192) at a time
            sl = slice(part, part + 8192)
            b, r, m = bins[sl], rows[sl], matched[sl]
            self.boot_kept += _boot_above(b, weights[:, r], t)
            self.boot_matched += _boot_above(b[m], weights[:, r[m]], t)


def _above(counts: np.ndarray) -> np.ndarray:
    """Counts per bin 0..T -> for each threshold i < T, the count of bins above i (sum of counts[i+1:])."""
    return np.cumsum(counts[::-1])[::-1][1:]


def _boot_above(bins: np.ndarray, w: np.ndarray, t: int) -> np.ndarray:
    replicates = w.shape[0]
    if not len(bins):
        return np.zeros((replicates, t))
    idx = (np.arange(replicates)[:, None] * (t + 1) + bins[None, :]).ravel()
    sums = np.bincount(idx, weights=w.ravel(), minlength=replicates * (t + 1)).reshape(replicates, t + 1)
    return np.cumsum(sums[:, ::-1], axis=1)[:, ::-1][:, 1:]


def poisson_weights(keys: list[str], replicates: int, seed: int) -> np.ndarray:
    """(replicates, rows) Poisson(1) bootstrap weights, each a function of (key, replicate, seed) alone, so
    a row weighs the same whichever shard or order it is read in."""
    h = np.array([int.from_bytes(hashlib.blake2b(k.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                                 "little") for k in keys], np.uint64)
    b = np.arange(replicates, dtype=np.uint64)[:, None]
    with np.errstate(over="ignore"):
        x = h[None, :] ^ ((b + np.uint64(1) + np.uint64(seed) * np.uint64(0x9E3779B1)) * np.uint64(0x9E3779B97F4A7C15))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)  # splitmix64's finalizer
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    u = (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.searchsorted(_POISSON1_CDF, u, side="right").astype(np.float64)


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def match_pairs(kept: list[tuple[float, tuple[int, int], tuple[float, ...]]],
                released: list[tuple[tuple[int, int], tuple[float, ...]]], min_iou: float) -> list[bool]:
    """Whether each kept (score, span, box) matches a released (span, box): same span, IoU >= min_iou, one
    to one, greedily by falling score (ties: input order), each taking its best-overlapping free pair."""
    out = [False] * len(kept)
    free = [True] * len(released)
    for p in sorted(range(len(kept)), key=lambda i: -kept[i][0]):
        _, span, box = kept[p]
        best, best_iou = -1, min_iou
        for q, (rspan, rbox) in enumerate(released):
            if free[q] and rspan == span:
                v = iou(box, rbox)
                if v >= best_iou and (best < 0 or v > best_iou):
                    best, best_iou = q, v
        if best >= 0:
            free[best] = False
            out[p] = True
    return out


# --- reading the run and the release -------------------------------------------------------------------------


class _Run:
    """The committed ingest, chunks and detect outputs of a run, shard by shard."""

    def __init__(self, uri: str, storage_options: dict | None):
        from grit_pipeline.engine.summary import committed_shards
        from grit_pipeline.rundir.store import RunDir

        self.rundir = RunDir(uri, storage_options)
        self.config = self.rundir.read_run_yaml()  # NotARun, or BadInput naming a run.yaml that is not one
        self.fps = dict(self.config.get("fingerprints") or {})
        missing = [s for s in ("ingest", "chunks", "detect") if s not in self.fps]
        if missing:
            raise CalibrationError(f"{uri}: run.yaml records no fingerprint for {missing}; run `grit run` "
                                   "through detect first")
        done = {s: set(committed_shards(self.rundir, s, self.fps[s])) for s in ("ingest", "chunks", "detect")}
        self.shards = sorted(done["ingest"] & done["chunks"] & done["detect"])
        self.pending = sorted(done["ingest"] - set(self.shards))

    def table(self, stage: str, shard: int, columns: list[str] | None = None, rejects: bool = False) -> pa.Table:
        return self.rundir.read_table(stage, self.fps[stage], shard, "rejects.parquet" if rejects else "parquet",
                                      columns=columns)

    def ingest_columns(self, shard: int) -> list[str]:
        return self.rundir.read_schema("ingest", self.fps["ingest"], shard).names


class _Release:
    """Rows of the GRIT-20M metadata, looked up by a join column, streamed per lookup (bounded memory)."""

    def __init__(self, uri: str, storage_options: dict | None):
        import fsspec

        self.fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        if self.fs.isdir(path):
            self.files = sorted(p for p in self.fs.find(path) if p.endswith((".parquet", ".jsonl", ".json")))
        else:
            self.files = [path]
        if not self.files:
            raise CalibrationError(f"{uri}: no .parquet or .jsonl files of GRIT-20M metadata")
        self.uri = uri
        self.columns = self._columns()
        for need in ("caption", "noun_chunks"):
            if need not in self.columns:
                raise CalibrationError(f"{uri}: no {need!r} column: not GRIT-20M metadata (columns: {self.columns})")

    def _columns(self) -> list[str]:
        first = self.files[0]
        if first.endswith(".parquet"):
            import pyarrow.parquet as pq

            with self.fs.open(first, "rb") as f:
                return pq.read_schema(f).names
        return next(self._json_batches(first)).schema.names

    def _json_batches(self, path: str):
        import pyarrow.json as pj

        with self.fs.open(path, "rb") as f:
            yield from pj.open_json(f)

    def lookup(self, join: str, values: list[Any]) -> dict[Any, tuple[str | None, Any]]:
        """value -> (caption, noun_chunks) of the release rows whose `join` column holds one of `values`."""
        import pyarrow.compute as pc

        wanted = pa.array([v for v in values if v is not None])
        out: dict[Any, tuple[str | None, Any]] = {}
        if not len(wanted):
            return out
        for path in self.files:
            if path.endswith(".parquet"):
                import pyarrow.dataset as pads

                ds = pads.dataset(path, filesystem=self.fs, format="parquet")
                batches = ds.to_batches(columns=[join, "caption", "noun_chunks"],
                                        filter=pc.field(join).isin(wanted.cast(ds.schema.field(join).type)))
            else:
                batches = self._json_batches(path)
            for batch in batches:
                table = pa.Table.from_batches([batch]).select([join, "caption", "noun_chunks"])
                hit = pc.is_in(table[join], value_set=wanted.cast(table.schema.field(join).type))
                for row in table.filter(hit).to_pylist():
                    out.setdefault(row[join], (row["caption"], row["noun_chunks"]))
        return out


def _released_pairs(entries: Any, counts: RowCounts) -> list[tuple[tuple[int, int], tuple[float, ...]]]:
    out = []
    for e in entries or []:
        if e is None or len(e) != 7 or any(v is None or not math.isfinite(float(v)) for v in e):
            counts.malformed_released += 1
            continue
        out.append(((int(e[0]), int(e[1])), tuple(float(v) for v in e[2:6])))
    return out


# --- the calibration ------------------------------------------------------------------------------------------


def calibrate(run_uri: str, options: CalibrateOptions | None = None) -> dict[str, Any]:
    """Compare the run's candidates with the released GLIP pairs at every threshold (module docstring);
    returns the report (what `calibration.json` holds)."""
    from stages.select import SelectConfig, SelectStage

    opt = options or CalibrateOptions()
    if not 0 < opt.step <= 0.1:
        raise CalibrationError(f"--step must be in (0, 0.1], not {opt.step}")
    if not opt.nms_ious or any(v <= 0 for v in opt.nms_ious):
        raise CalibrationError(f"--nms-iou values must be > 0 (>= 1 turns NMS off), not {opt.nms_ious}")
    run = _Run(run_uri, opt.storage_options)
    if not run.shards:
        raise CalibrationError(f"{run_uri}: no shard is committed through detect yet", code=1)
    release = _Release(opt.release, opt.storage_options) if opt.release else None
    run_select = {k: v for k, v in (run.config.get("select") or {}).items() if k in SelectConfig.model_fields}
    base_select = SelectConfig.model_validate(run_select)
    thresholds = np.round(np.arange(0.0, 1.0, opt.step), 6)
    thr32 = thresholds.astype(np.float32)
    nms_ious = tuple(sorted(set(float(v) for v in opt.nms_ious)))
    tallies = {v: Tally(len(thresholds), opt.replicates) for v in nms_ious}
    selects = {v: SelectStage(base_select.model_copy(update={"min_score": 0.0, "nms_iou": v})) for v in nms_ious}
    counts = RowCounts()
    boot_released = np.zeros(opt.replicates)
    join = None
    for shard in run.shards:
        rows = _shard_rows(run, shard, release, opt, counts, join)
        join = rows.join
        if not rows.keys:
            continue
        weights = poisson_weights(rows.keys, opt.replicates, opt.seed)
        boot_released += weights @ np.array([len(r) for r in rows.released], np.float64)
        for v in nms_ious:
            bins, row_of, matched = _kept_pairs(selects[v], rows, thr32, opt.match_iou)
            tallies[v].add(bins, row_of, matched, len(rows.keys), weights)
    if counts.compared == 0:
        raise CalibrationError(_nothing_compared(run_uri, counts), code=1)
    return _report(run_uri, opt, run, release, join, thresholds, tallies, boot_released, counts, base_select)


@dataclass
class _ShardRows:
    """The compared rows of one shard: key, the run's chunk spans, the released pairs, detect's candidates."""

    join: str | None
    keys: list[str] = field(default_factory=list)
    spans: list[list[tuple[int, int]]] = field(default_factory=list)
    released: list[list[tuple[tuple[int, int], tuple[float, ...]]]] = field(default_factory=list)
    select_input: pa.Table | None = None  # key, candidates, chunks of compared rows detect kept
    select_row: dict[str, int] = field(default_factory=dict)  # key -> index into `keys`


def _shard_rows(run: _Run, shard: int, release: _Release | None, opt: CalibrateOptions, counts: RowCounts,
                join: str | None) -> _ShardRows:
    names = run.ingest_columns(shard)
    if release is None:
        if RELEASED not in names:
            raise CalibrationError(
                f"{run.rundir.uri}: ingest shard {shard} has no {RELEASED} column (the GRIT-20M `noun_chunks` "
                "that `grit download` passes through); give the metadata with --release PATH")
        ingest = run.table("ingest", shard, ["key", "caption", RELEASED])
        lookup = None
    else:
        join = join or _choose_join(release, names, opt.join)
        column = join if join in names else f"src_{join}"
        ingest = run.table("ingest", shard, ["key", "caption", column]).rename_columns(["key", "caption", "join"])
        lookup = release.lookup(join, ingest["join"].to_pylist())
    chunks = run.table("chunks", shard, ["key", "chunks"])
    detect = run.table("detect", shard, ["key", "candidates"])
    detect_rejects = run.table("detect", shard, ["key", "reason"], rejects=True)
    rejected = dict(zip(detect_rejects["key"].to_pylist(), detect_rejects["reason"].to_pylist(), strict=True))
    chunk_at = {k: i for i, k in enumerate(chunks["key"].to_pylist())}
    detect_at = {k: i for i, k in enumerate(detect["key"].to_pylist())}
    chunk_lists = chunks["chunks"].to_pylist()
    out = _ShardRows(join)
    take = []
    for row in ingest.to_pylist():
        counts.seen += 1
        key = row["key"]
        if lookup is None:
            entries = row[RELEASED]
        else:
            found = lookup.get(row["join"])
            if found is not None and found[0] != row["caption"]:
                counts.caption_differs += 1
                continue
            entries = found[1] if found is not None else None
        released = _released_pairs(entries, counts)
        if not released:
            counts.no_release += 1
            continue
        spans = [(c["start"], c["end"]) for c in chunk_lists[chunk_at[key]]] if key in chunk_at else []
        if not {s for s, _ in released} <= set(spans):
            counts.chunks_differ += 1
            continue
        if key not in detect_at and rejected.get(key) != NO_DETECTION:
            counts.not_detected[rejected.get(key, "missing from detect's output")] += 1
            continue
        counts.compared += 1
        counts.released_pairs += len(released)
        if key in detect_at:
            out.select_row[key] = len(out.keys)
            take.append((detect_at[key], chunk_at[key]))
        out.keys.append(key)
        out.spans.append(spans)
        out.released.append(released)
    if take:
        d_idx = pa.array([d for d, _ in take], pa.int64())
        c_idx = pa.array([c for _, c in take], pa.int64())
        out.select_input = pa.table({"key": detect["key"].take(d_idx), "candidates": detect["candidates"].take(d_idx),
                                     "chunks": chunks["chunks"].take(c_idx)})
    return out


def _choose_join(release: _Release, run_columns: list[str], given: str | None) -> str:
    def on_run(name: str) -> bool:
        return name in run_columns or f"src_{name}" in run_columns

    if given is not None:
        if given not in release.columns or not on_run(given):
            raise CalibrationError(f"--join {given!r}: the run's ingest output and the release must both have it "
                                   f"(release columns: {release.columns})")
        return given
    for name in ("id", "url"):
        if name in release.columns and on_run(name):
            return name
    raise CalibrationError("no column to join the run's rows to the release on (looked for id, url); "
                           "give one with --join")


def _kept_pairs(select, rows: _ShardRows, thr32: np.ndarray, match_iou: float):
    """The shard's pairs kept by `select` at min_score 0: (bins, row index, matched) per pair."""
    scores, row_of, matched = [], [], []
    if rows.select_input is not None:
        pairs = select.process_batch(rows.select_input).output
        for key, plist in zip(pairs["key"].to_pylist(), pairs["pairs"].to_pylist(), strict=True):
            r = rows.select_row[key]
            kept = [(p["score"], rows.spans[r][p["chunk"]], (p["x1"], p["y1"], p["x2"], p["y2"])) for p in plist]
            matched.extend(match_pairs(kept, rows.released[r], match_iou))
            scores.extend(p["score"] for p in plist)
            row_of.extend([r] * len(kept))
    # a pair is kept at threshold i when its float32 score > thr32[i]: bins = thresholds below the score
    bins = np.searchsorted(thr32, np.asarray(scores, np.float32), side="left").astype(np.int64)
    return bins, np.asarray(row_of, np.int64), np.asarray(matched, bool)


def _nothing_compared(uri: str, c: RowCounts) -> str:
    why = [f"{c.seen:,} rows read", f"{c.no_release:,} without released pairs",
           f"{c.chunks_differ:,} whose chunks differ from the release", f"{c.caption_differs:,} whose caption differs",
           f"{sum(c.not_detected.values()):,} not detected"]
    return (f"{uri}: no row to compare ({'; '.join(why)}). Calibrate a run over GRIT-20M rows fetched with "
            "`grit download` (their noun_chunks pass through), or give the metadata with --release")


# --- the report -------------------------------------------------------------------------------------------


def _f1(matched, kept, released):
    denom = kept + released
    return np.divide(2.0 * matched, denom, out=np.zeros(np.shape(denom)), where=denom > 0)


def _best_index(f1: np.ndarray) -> int:
    """Index of the highest F1; over a plateau of equal F1, its middle."""
    top = np.flatnonzero(f1 >= f1.max() - 1e-12)
    return int(top[len(top) // 2])


def _report(uri, opt, run, release, join, thresholds, tallies, boot_released, counts, base_select) -> dict[str, Any]:
    released = counts.released_pairs
    rows_released = counts.compared
    by_nms: dict[str, Any] = {}
    best_f1 = {}
    for v, t in tallies.items():
        f1 = _f1(t.matched, t.kept, released)
        i = _best_index(f1)
        best_f1[v] = float(f1[i])
        precision = np.divide(t.matched, t.kept, out=np.ones(len(t.kept)), where=t.kept > 0)
        recall = t.matched / released
        by_nms[_fmt(v)] = {
            "pairs_kept": t.kept.tolist(), "pairs_matched": t.matched.tolist(),
            "precision": _rounded(precision), "recall": _rounded(recall), "f1": _rounded(f1),
            "captions_kept": t.captions.tolist(), "best_f1": round(float(f1[i]), 6),
            "best_min_score": float(thresholds[i]),
        }
    top = max(best_f1.values())
    tied = [v for v in tallies if best_f1[v] >= top - 1e-12]
    nms = min(tied, key=lambda v: (abs(v - base_select.nms_iou), v))
    t = tallies[nms]
    f1 = _f1(t.matched, t.kept, released)
    i = _best_index(f1)
    boot_f1 = _f1(t.boot_matched, t.boot_kept, boot_released[:, None])
    boot_idx = np.array([_best_index(row) for row in boot_f1])
    lo, hi = np.quantile(thresholds[boot_idx], [0.025, 0.975])
    f1_lo, f1_hi = np.quantile(boot_f1[np.arange(len(boot_idx)), boot_idx], [0.025, 0.975])

    def at(threshold: float, v: float) -> dict[str, Any]:
        k = int(np.searchsorted(np.float32(thresholds), np.float32(threshold), side="right")) - 1
        k = max(k, 0)
        row = by_nms[_fmt(v)]
        return {"min_score": float(thresholds[k]), "nms_iou": v, **{name: row[name][k] for name in (
            "pairs_kept", "pairs_matched", "precision", "recall", "f1", "captions_kept")}}

    return {
        "run": uri,
        "release": opt.release or f"the run's {RELEASED}",
        "join": join,
        "shards": {"compared": len(run.shards), "not_through_detect": run.pending},
        "rows": {"seen": counts.seen, "compared": counts.compared, "no_released_pairs": counts.no_release,
                 "chunks_differ": counts.chunks_differ, "caption_differs": counts.caption_differs,
                 "not_detected": dict(sorted(counts.not_detected.items())),
                 "released_pairs": released, "malformed_released_entries": counts.malformed_released},
        "match": {"same_span": True, "min_iou": opt.match_iou},
        "select_rules": {k: getattr(base_select, k) for k in ("nms_scope", "max_box_area", "max_pairs")},
        "recommended": {
            "min_score": float(thresholds[i]), "nms_iou": nms, "f1": round(float(f1[i]), 6),
            "precision": by_nms[_fmt(nms)]["precision"][i], "recall": by_nms[_fmt(nms)]["recall"][i],
            "pairs_kept": int(t.kept[i]), "captions_kept": int(t.captions[i]), "captions_released": rows_released,
            "interval": [round(max(0.0, float(lo) - opt.step), 6), round(min(1.0, float(hi) + opt.step), 6)],
            "f1_interval": [round(float(f1_lo), 6), round(float(f1_hi), 6)],
            "replicates": opt.replicates, "seed": opt.seed,
        },
        "at_paper_threshold": at(PAPER_THRESHOLD, nms),
        "at_run_config": at(base_select.min_score, base_select.nms_iou) if base_select.nms_iou in tallies else None,
        "grid": {"step": opt.step, "thresholds": thresholds.tolist()},
        "by_nms_iou": by_nms,
    }


def _fmt(v: float) -> str:
    return f"{v:g}"


def _rounded(a: np.ndarray) -> list[float]:
    return [round(float(x), 6) for x in a]


def write_outputs(run_uri: str, report: dict[str, Any], storage_options: dict | None = None) -> list[str]:
    """`report/calibration.json` and `report/calibration.png` in the run; returns their paths."""
    from grit_pipeline.rundir.store import RunDir

    rundir = RunDir(run_uri, storage_options)
    paths = [rundir.write_json(REPORT_JSON, report)]
    png = rundir.path(REPORT_PNG)
    rundir.put_atomic(png, curve_png(report))
    paths.append(png)
    return paths


def curve_png(report: dict[str, Any]) -> bytes:
    """Precision, recall and F1 against min_score at the recommended nms_iou (F1 of the others faint), the
    recommendation with its interval, and the paper's 0.65."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = report["recommended"]
    x = report["grid"]["thresholds"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for v, row in report["by_nms_iou"].items():
        if float(v) != rec["nms_iou"]:
            ax.plot(x, row["f1"], color="0.8", linewidth=0.8)
    row = report["by_nms_iou"][_fmt(rec["nms_iou"])]
    ax.plot(x, row["precision"], label="precision", color="tab:blue")
    ax.plot(x, row["recall"], label="recall", color="tab:orange")
    ax.plot(x, row["f1"], label=f"F1 (nms_iou {rec['nms_iou']:g}; grey: other nms_iou)", color="tab:green")
    ax.axvspan(*rec["interval"], color="tab:green", alpha=0.15)
    ax.axvline(rec["min_score"], color="tab:green", linestyle="--",
               label=f"recommended {rec['min_score']:.3f} [{rec['interval'][0]:.3f}, {rec['interval'][1]:.3f}]")
    ax.axvline(PAPER_THRESHOLD, color="0.4", linestyle=":", label="the paper's 0.65 (GLIP's scale)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("select.min_score")
    ax.set_ylabel("against the released GLIP pairs")
    ax.set_title(f"grit calibrate: {report['rows']['compared']:,} rows, {report['rows']['released_pairs']:,} released pairs")
    ax.legend(loc="lower left", fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def render(report: dict[str, Any], every: float = 0.05):
    """The report as rich renderables: row counts, the table at every `every` (and the recommended and 0.65
    rows) for the recommended nms_iou, each nms_iou's best F1, the recommendation."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from schemas.display import display_text

    rec, rows = report["recommended"], report["rows"]
    nd = ", ".join(f"{display_text(k)} {v:,}" for k, v in rows["not_detected"].items()) or "0"
    lines = [Text(display_text(f"{report['run']}: {rows['compared']:,} of {rows['seen']:,} rows compared with "
                               f"{report['release']} ({rows['released_pairs']:,} released pairs)")),
             Text(f"left out, counted: no released pairs {rows['no_released_pairs']:,}; chunks differ from the "
                  f"release {rows['chunks_differ']:,}; caption differs {rows['caption_differs']:,}; "
                  f"not detected {nd}", style="dim")]
    table = Table(title=f"against the release at nms_iou {rec['nms_iou']:g}", title_justify="left")
    for col in ("min_score", "pairs kept", "matched", "precision", "recall", "F1", "captions kept"):
        table.add_column(col, justify="right")
    row = report["by_nms_iou"][_fmt(rec["nms_iou"])]
    x = report["grid"]["thresholds"]
    step = report["grid"]["step"]
    stride = max(1, round(every / step))
    marks = {i for i in range(0, len(x), stride)}
    marks |= {x.index(rec["min_score"]), min(range(len(x)), key=lambda i: abs(x[i] - PAPER_THRESHOLD))}
    for i in sorted(marks):
        style = "bold green" if x[i] == rec["min_score"] else None
        share = row["captions_kept"][i] / max(rows["compared"], 1)
        table.add_row(f"{x[i]:.3f}", f"{row['pairs_kept'][i]:,}", f"{row['pairs_matched'][i]:,}",
                      f"{row['precision'][i]:.3f}", f"{row['recall'][i]:.3f}", f"{row['f1'][i]:.3f}",
                      f"{row['captions_kept'][i]:,} ({share:.0%})", style=style)
    per_nms = "; ".join(f"{v}: F1 {r['best_f1']:.3f} at {r['best_min_score']:.3f}"
                        for v, r in report["by_nms_iou"].items())
    paper = report["at_paper_threshold"]
    summary = Text(
        f"recommended: select.min_score={rec['min_score']:.3f} select.nms_iou={rec['nms_iou']:g}  "
        f"(F1 {rec['f1']:.3f}, 95% interval of the threshold [{rec['interval'][0]:.3f}, {rec['interval'][1]:.3f}] "
        f"from {rec['replicates']} bootstrap replicates; at 0.65: F1 {paper['f1']:.3f})", style="bold")
    return Group(*lines, table, Text(f"best per nms_iou: {per_nms}", style="dim"), summary)


# --- the command -------------------------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate_command)


def calibrate_command(
    run: RunArg,
    release: Annotated[str | None, typer.Option(
        "--release", help="GRIT-20M metadata the run's rows came from (Parquet or JSON Lines, file or folder). "
        "Default: the run's own src_noun_chunks, which `grit download` passes through.")] = None,
    join: Annotated[str | None, typer.Option("--join", help="Column joining run rows to release rows "
                                             "(default: id, else url).")] = None,
    step: Annotated[float, typer.Option("--step", min=0.0001, max=0.1, help="Threshold grid step.")] = 0.001,
    nms_iou: Annotated[str, typer.Option("--nms-iou", help="select.nms_iou values to try, comma-separated "
                                         "(>= 1 turns NMS off).")] = ",".join(f"{v:g}" for v in DEFAULT_NMS_IOUS),
    match_iou: Annotated[float, typer.Option("--match-iou", min=0.0, max=1.0,
                                             help="Box IoU at which a pair matches a released pair.")] = 0.5,
    replicates: Annotated[int, typer.Option("--replicates", min=10, help="Bootstrap replicates.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Bootstrap seed.")] = 0,
    write: Annotated[bool, typer.Option("--write/--no-write", help="Write report/calibration.json and .png "
                                        "into the run.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Find the select.min_score (and nms_iou) that reproduces GLIP's selection in released GRIT-20M."""
    import json

    from rich.console import Console

    from schemas.display import display_text

    try:
        ious = tuple(float(v) for v in nms_iou.split(",") if v.strip())
    except ValueError:
        typer.echo(f"error: --nms-iou {display_text(nms_iou)!r}: give numbers separated by commas", err=True)
        raise typer.Exit(2) from None
    options = CalibrateOptions(release=release, join=join, step=step, nms_ious=ious, match_iou=match_iou,
                               replicates=replicates, seed=seed)
    report = calibrate(run, options)  # CalibrationError, NotARun: shown by `grit`'s one error handler
    written = write_outputs(run, report) if write else []
    if as_json:
        typer.echo(json.dumps(report))
        return
    console = Console()
    console.print(render(report))
    for path in written:
        console.print(f"wrote {display_text(path)}")
