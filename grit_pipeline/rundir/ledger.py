"""Ledgers: compacted, append-only records of what a run committed, readable in a few objects whatever
the run's size (DESIGN.md: "cost per shard is flat in the number of shards").

A ledger is a folder of the run directory:

    <folder>/_ledger/seg-000000.jsonl   one JSON object per line, one line per record; SEGMENT_RECORDS lines,
    <folder>/_ledger/seg-000001.jsonl   then it is sealed and the next one starts
    <folder>/_ledger/summary.json       the fold of every sealed segment up to `through`

where `<folder>` is a stage's output folder (`stages/<stage>/<fp>/`: one record per committed or failed
shard, written by the driver next to the `_done` markers) or `publish/` (one per published shard, for
every compose fingerprint, written by the publisher: `grit_pipeline.engine.publish.PublishFold`). Each
ledger has one writer. The writer keeps the open segment's lines and rewrites that object whole on each
`flush` (object stores have no append; a segment is bounded, so a rewrite is too); when it is full it is
sealed, folded into `summary.json`, and a new one starts. A reader
gets everything from `summary.json` plus the segments after its `through` (normally one): O(1) objects,
never one per shard, and no listing. `LedgerReader` keeps what it has read, so a refresh re-reads only
the open segment.

What a record folds into is the ledger's `Fold` (`StageFold` here: committed and failed shards as
ranges, rows in and out, rejects by reason, counters, worker seconds, peak memory, commits per minute of
the last hour). Markers stay the commit truth; a ledger is a summary of them and can always be rebuilt
(`grit_pipeline.engine.bookkeeping`).
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from grit_pipeline.rundir.store import RunDir, json_bytes
from grit_pipeline.shard_ranges import ShardRanges
from stages.retry import with_retries

log = logging.getLogger(__name__)

LEDGER = "_ledger"
SUMMARY = "summary.json"
SEGMENT_RECORDS = 1000
FORMAT = 1
RECENT_MINUTES = 60  # commits per minute kept for throughput over the last hour
LATEST_FAILURES = 5


def segment_name(n: int) -> str:
    return f"seg-{n:06d}.jsonl"


def record_line(record: Mapping[str, Any]) -> str:
    """One record as one line: sorted keys, ASCII only (escapes every control character)."""
    return json.dumps(dict(record), sort_keys=True, ensure_ascii=True, separators=(",", ":"))


class Fold:
    """How records add up. Subclasses define `empty`, `add` and `to_json`/`from_json` of their state."""

    kind: ClassVar[str] = "records"

    def __init__(self) -> None:
        self.records = 0

    def add(self, record: Mapping[str, Any]) -> None:
        self.records += 1

    def to_json(self) -> dict[str, Any]:
        return {"records": self.records}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fold:
        fold = cls()
        fold.records = int(data.get("records", 0))
        return fold

    def copy(self) -> Fold:
        return type(self).from_json(json.loads(json.dumps(self.to_json())))


class StageFold(Fold):
    """A stage's ledger: `{"shard", "time", ...marker fields, ...stats}` per commit, `{"shard", "time",
    "failed": message, "error_type"}` per failure. A failure counts until the shard commits."""

    kind: ClassVar[str] = "stage"

    def __init__(self) -> None:
        super().__init__()
        self.committed = ShardRanges()
        self.failed = ShardRanges()
        self.rows_in = 0
        self.rows_out = 0
        self.rejects: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        self.seconds = 0.0
        self.peak_rss_mb = 0.0
        self.first_time: float | None = None
        self.last_time: float | None = None
        self.per_minute: dict[int, list[int]] = {}  # minute (epoch // 60) -> [commits, rows in]
        self.latest_failures: list[dict[str, Any]] = []
        self.failures = 0  # failure records

    def add(self, record: Mapping[str, Any]) -> None:
        super().add(record)
        shard = int(record["shard"])
        t = record.get("time")
        if "failed" in record:
            self.failures += 1
            if shard not in self.committed:
                self.failed.add(shard)
            self.latest_failures = [*self.latest_failures, {k: record.get(k) for k in (
                "time", "shard", "key", "error_type", "failed")}][-LATEST_FAILURES:]
            return
        if shard in self.committed:  # never counted twice (a rebuilt ledger meeting an old record)
            return
        self.committed.add(shard)
        self.failed.discard(shard)
        rows_in = int(record.get("rows_in", 0))
        self.rows_in += rows_in
        self.rows_out += int(record.get("rows", 0))
        self.rejects.update({str(k): int(v) for k, v in (record.get("reject_reasons") or {}).items()})
        self.counters.update({str(k): int(v) for k, v in (record.get("counters") or {}).items()})
        self.seconds += float(record.get("seconds", 0.0))
        self.peak_rss_mb = max(self.peak_rss_mb, float(record.get("peak_rss_mb", 0.0)))
        if isinstance(t, (int, float)):
            self.first_time = t if self.first_time is None else min(self.first_time, t)
            self.last_time = t if self.last_time is None else max(self.last_time, t)
            minute = int(t // 60)
            bucket = self.per_minute.setdefault(minute, [0, 0])
            bucket[0] += 1
            bucket[1] += rows_in
            horizon = minute - RECENT_MINUTES
            if len(self.per_minute) > RECENT_MINUTES + 1:
                self.per_minute = {m: v for m, v in self.per_minute.items() if m > horizon}

    def recent(self, now: float, window_s: float) -> tuple[int, int]:
        """(commits, rows in) of commits in the last `window_s` seconds (at minute resolution, at most an hour)."""
        lo = (now - window_s) // 60
        commits = rows = 0
        for minute, (n, r) in self.per_minute.items():
            if minute >= lo:
                commits += n
                rows += r
        return commits, rows

    def to_json(self) -> dict[str, Any]:
        return {
            "records": self.records, "committed": str(self.committed), "failed": str(self.failed),
            "shards": len(self.committed), "rows_in": self.rows_in, "rows_out": self.rows_out,
            "rejects": dict(sorted(self.rejects.items())), "counters": dict(sorted(self.counters.items())),
            "seconds": round(self.seconds, 4), "peak_rss_mb": round(self.peak_rss_mb, 1),
            "first_time": self.first_time, "last_time": self.last_time,
            "per_minute": {str(m): v for m, v in sorted(self.per_minute.items())},
            "latest_failures": self.latest_failures, "failures": self.failures,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StageFold:
        fold = cls()
        fold.records = int(data.get("records", 0))
        fold.committed = ShardRanges.parse(data.get("committed", ""))
        fold.failed = ShardRanges.parse(data.get("failed", ""))
        fold.rows_in, fold.rows_out = int(data.get("rows_in", 0)), int(data.get("rows_out", 0))
        fold.rejects = Counter({str(k): int(v) for k, v in (data.get("rejects") or {}).items()})
        fold.counters = Counter({str(k): int(v) for k, v in (data.get("counters") or {}).items()})
        fold.seconds = float(data.get("seconds", 0.0))
        fold.peak_rss_mb = float(data.get("peak_rss_mb", 0.0))
        fold.first_time, fold.last_time = data.get("first_time"), data.get("last_time")
        fold.per_minute = {int(m): [int(v[0]), int(v[1])] for m, v in (data.get("per_minute") or {}).items()}
        fold.latest_failures = list(data.get("latest_failures") or [])
        fold.failures = int(data.get("failures", 0))
        return fold

    def stats(self, stage: str, fingerprint: str) -> dict[str, Any]:
        """This stage's entry of the run summary (`grit_pipeline.engine.stats.merge`'s per-stage form)."""
        return {"fingerprint": fingerprint, "shards": len(self.committed), "rows_in": self.rows_in,
                "rows_out": self.rows_out, "rejects": dict(sorted(self.rejects.items())),
                "counters": dict(sorted(self.counters.items())), "seconds": round(self.seconds, 3),
                "peak_rss_mb": round(self.peak_rss_mb, 1)}


class _Segments:
    """Paths and reads of a ledger folder's objects."""

    def __init__(self, rundir: RunDir, folder: str):
        self.rundir = rundir
        self.folder = folder.strip("/")

    def path(self, name: str) -> str:
        return self.rundir.path(self.folder, LEDGER, name)

    def _read(self, name: str) -> bytes:
        return with_retries(lambda: self.rundir.read_bytes(self.path(name)),
                            what=f"read {self.rundir.url(self.folder, LEDGER, name)}")

    def read_summary(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self._read(SUMMARY))
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("%s is not JSON; folding the ledger from its segments", self.rundir.url(self.folder, LEDGER, SUMMARY))
            return None
        return data if isinstance(data, dict) and data.get("format") == FORMAT else None

    def read_segment(self, n: int) -> list[dict[str, Any]] | None:
        """The records of segment `n`, None if it does not exist. A line cut short (a torn write on a store
        without atomic writes) ends the segment."""
        try:
            text = self._read(segment_name(n)).decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None
        out = []
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                log.warning("%s: a line cut short; the records after it are ignored",
                            self.rundir.url(self.folder, LEDGER, segment_name(n)))
                break
            if isinstance(rec, dict) and "shard" in rec:
                out.append(rec)
        return out

    def exists(self) -> bool:
        return self.rundir.fs.exists(self.path(segment_name(0))) or self.rundir.fs.exists(self.path(SUMMARY))


class LedgerReader:
    """Reads a ledger: the summary and the segments after it, keeping them so that `read` again costs one
    GET (the open segment) plus one per segment sealed since."""

    def __init__(self, rundir: RunDir, folder: str, fold_cls: type[Fold] = StageFold):
        self.seg = _Segments(rundir, folder)
        self.fold_cls = fold_cls
        self._base: Fold | None = None  # the fold of every sealed segment read so far
        self._next = 0  # first segment not folded into _base
        self.found = False  # whether any ledger object exists
        self.position = (0, 0)  # (open segment, its lines) as of the last read: a writer's `position`

    def read(self) -> Fold:
        """The fold of every record in the ledger (an empty fold if there is no ledger; see `found`)."""
        if self._base is None:
            summary = self.seg.read_summary()
            if summary is not None:
                self._base = self.fold_cls.from_json(summary["fold"])
                self._next = int(summary["through"]) + 1
                self.found = True
            else:
                self._base, self._next = self.fold_cls(), 0
        fold = self._base.copy()
        n = self._next
        lines = 0
        while True:
            records = self.seg.read_segment(n)
            if records is None:
                break
            self.found = True
            for rec in records:
                fold.add(rec)
            if len(records) < SEGMENT_RECORDS:
                lines = len(records)
                break
            self._base = fold.copy()  # sealed: never read again
            self._next = n = n + 1
        self.position = (n, lines)
        return fold


def read_segment(rundir: RunDir, folder: str, n: int) -> list[dict[str, Any]] | None:
    """The records of segment `n` of a ledger, None if it does not exist: for a writer that keeps state per
    record beyond its fold (the publisher's reuse check reads the segments of published shards once)."""
    return _Segments(rundir, folder).read_segment(n)


def read_ledger(rundir: RunDir, folder: str, fold_cls: type[Fold] = StageFold) -> tuple[Fold, bool]:
    """(the fold of a ledger, whether it exists)."""
    reader = LedgerReader(rundir, folder, fold_cls)
    fold = reader.read()
    return fold, reader.found


class LedgerWriter:
    """The one writer of a ledger: appends records, rewrites the open segment on `flush`, seals full
    segments and folds them into the summary. Opening continues where the last writer stopped."""

    def __init__(self, rundir: RunDir, folder: str, fold_cls: type[Fold] = StageFold, *, fresh: bool = False):
        self.rundir = rundir
        self.seg = _Segments(rundir, folder)
        self.fold_cls = fold_cls
        self.folder = self.seg.folder
        if fresh:
            self._remove()
        summary = None if fresh else self.seg.read_summary()
        self.sealed = fold_cls.from_json(summary["fold"]) if summary else fold_cls()  # summary + sealed segments
        self.through = int(summary["through"]) if summary else -1  # last segment folded into summary.json
        self.segment = self.through + 1  # the open segment
        self.lines: list[str] = []
        self.dirty = False
        pending_fold = False
        while not fresh:  # segments after the summary: sealed ones fold in, the last one stays open
            records = self.seg.read_segment(self.segment)
            if records is None:
                break
            if len(records) >= SEGMENT_RECORDS:
                for rec in records:
                    self.sealed.add(rec)
                self.segment += 1
                pending_fold = True
                continue
            self.lines = [record_line(r) for r in records]
            break
        self.fold = self.sealed.copy()
        for line in self.lines:
            self.fold.add(json.loads(line))
        self.existed = summary is not None or self.segment > 0 or bool(self.lines)
        if pending_fold:
            self._write_summary()

    def ensure(self) -> None:
        """Write an empty summary if the ledger has no object yet, so readers know it is kept."""
        if not self.existed:
            self._write_summary()
            self.existed = True

    def _remove(self) -> None:
        base = self.rundir.path(self.folder, LEDGER)
        try:
            self.rundir.fs.rm(base, recursive=True)
        except FileNotFoundError:
            pass

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Add records (in memory until `flush`). Full segments are sealed at the next flush."""
        for rec in records:
            rec = dict(rec)
            rec.setdefault("time", round(time.time(), 3))
            self.lines.append(record_line(rec))
            self.fold.add(rec)
            self.dirty = True

    def flush(self) -> int:
        """Write what was appended: full segments sealed (and folded into the summary), the open one
        rewritten. Returns the number of objects written."""
        if not self.dirty:
            return 0
        writes = 0
        while len(self.lines) >= SEGMENT_RECORDS:
            full = self.lines[:SEGMENT_RECORDS]
            self._put(self.segment, full)  # nothing changes before the write succeeds: a retry redoes it
            self.lines = self.lines[SEGMENT_RECORDS:]
            for line in full:
                self.sealed.add(json.loads(line))
            self.segment += 1
            writes += 1
        if self.lines:
            self._put(self.segment, self.lines)
            writes += 1
        if self.through < self.segment - 1:
            self._write_summary()
            writes += 1
        self.dirty = False
        return writes

    def _put(self, n: int, lines: list[str]) -> None:
        self.rundir.put_atomic(self.seg.path(segment_name(n)), ("\n".join(lines) + "\n").encode("ascii"))

    def _write_summary(self) -> None:
        self.through = self.segment - 1
        self.rundir.put_atomic(self.seg.path(SUMMARY), json_bytes({
            "format": FORMAT, "kind": self.fold_cls.kind, "through": self.through, "fold": self.sealed.to_json()}))

    @property
    def position(self) -> tuple[int, int]:
        """(open segment, its lines): changes whenever something new is flushed (for progress.json)."""
        return self.segment, len(self.lines)


def ledger_folder(stage: str, fingerprint: str) -> str:
    """The folder of a stage's ledger, relative to the run: `stages/<stage>/<fp>`."""
    return posixpath.join("stages", stage, fingerprint)
