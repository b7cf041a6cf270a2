"""The driver's bookkeeping: `_done` markers, the stages' ledgers and `progress.json`, written by one
thread so the scheduling loop never waits on the store, and read back at the start of a run.

    ledgers = open_ledgers(plan)                      # each stage's ledger, reconciled with its markers
    cleaned = clean_leftovers(plan, ledgers)          # files of shards in flight or failed last time
    keeper = Bookkeeper(plan.rundir, ledgers, view={...})
    keeper.commit(stage, shard, marker, stats)        # from the scheduling loop: returns at once
    keeper.events()                                   # markers now durable (or failed), for the loop
    keeper.close("finished")                          # everything queued written, ledgers flushed

**Order.** Commits are written in the order the loop handed them over, a batch at a time; inside a batch
the markers of earlier stages go first (concurrent PUTs per stage on object stores), so a shard's later
stage is never committed before an earlier one. A shard whose marker cannot be written is reported
failed (`events`), and its later markers are dropped. The loop publishes a final shard only once its
compose marker is reported durable.

**Ledgers.** After a batch of markers is durable, one record per commit (the marker plus the shard's
stats: counters, seconds, peak memory) goes into its stage's ledger (`grit_pipeline.rundir.ledger`),
flushed at most every `FLUSH_S` seconds, with `progress.json` (what is in flight, where each ledger
stands). A crash loses at most the records of the last `FLUSH_S` seconds; the markers stay the truth
and `open_ledgers` adds what a ledger misses at the next start (and rebuilds a ledger that claims a
shard whose marker is gone), reading only those shards' markers and stats.

**progress.json** is written as `running` when the bookkeeper starts, before any marker, and with the
run's end state at `close`: a `finished` one, with each ledger's position, tells the next `build_plan`
that the ledgers hold exactly what the markers do (see `grit_pipeline.engine.plan`).

**Leftovers.** An interrupted run leaves shard files without a marker only for shards that were in flight
or failed. `clean_leftovers` removes exactly those (the previous run's `progress.json` says what was in
flight, the ledgers what failed): no listing of the stage folders.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from grit_pipeline.rundir.ledger import LedgerWriter, StageFold, ledger_folder, read_segment
from grit_pipeline.rundir.progress import read_progress, write_progress
from grit_pipeline.rundir.store import RunDir, json_bytes, shard_name
from grit_pipeline.shard_ranges import ShardRanges
from stages.retry import with_retries

log = logging.getLogger(__name__)

FLUSH_S = 5.0  # ledgers and progress.json: at most this often while commits arrive
PROGRESS_S = 30.0  # progress.json at least this often (a live run's view stays fresh)
READ_CHUNK = 1000  # markers read at once when a ledger catches up
SHARD_FILES = ("parquet", "rejects.parquet", "stats.json")
RECORD_STATS = ("counters", "seconds", "peak_rss_mb")


@dataclass(frozen=True)
class CommitEvent:
    stage: str
    shard: int
    error: str | None = None  # None: the marker is durable


# --- the start of a run --------------------------------------------------------------------------------
def commit_record(marker: Mapping[str, Any], stats: Mapping[str, Any] | None, when: float | None) -> dict[str, Any]:
    """The ledger record of a commit: the marker without its stage and fingerprint (the ledger's folder
    says them), the shard's stats, and when it was committed."""
    rec = {k: v for k, v in marker.items() if k not in ("stage", "fingerprint")}
    for k in RECORD_STATS:
        if stats and k in stats:
            rec[k] = stats[k]
    rec["time"] = when
    return rec


def records_from_markers(rundir: RunDir, stage: str, fp: str, shards: Iterable[int]) -> list[dict[str, Any]]:
    """Ledger records rebuilt from committed shards' markers and stats files (read concurrently)."""
    out = []
    shards = sorted(shards)
    for i in range(0, len(shards), READ_CHUNK):
        chunk = shards[i:i + READ_CHUNK]
        markers = with_retries(lambda c=chunk: rundir.markers(stage, fp, c), what=f"read {stage} markers")
        stats = with_retries(lambda c=chunk: rundir.read_stats(stage, fp, c, missing_ok=True),
                             what=f"read {stage} stats")
        out.extend(_rebuilt_record(markers[s], stats.get(s)) for s in chunk)
    return out


def _rebuilt_record(marker: Mapping[str, Any], stats: Mapping[str, Any] | None) -> dict[str, Any]:
    """A commit's record from its files: the stats file's counts where it has them (markers of older
    versions hold no rows in nor reject reasons)."""
    rec = commit_record(marker, stats, None)
    if stats:
        rec["rows_in"] = stats.get("rows_in", rec.get("rows_in"))
        rec["rows"] = stats.get("rows_out", rec.get("rows"))
        rec["reject_reasons"] = stats.get("rejects", rec.get("reject_reasons"))
    return rec


def open_ledger(rundir: RunDir, stage: str, fp: str, committed: ShardRanges) -> LedgerWriter:
    """The ledger of `stage` under `fp`, brought level with `committed` (the shards whose markers a
    listing of `_done/` found): missing commits are added from their markers; a ledger that claims a shard
    without a marker is rebuilt from the markers."""
    folder = ledger_folder(stage, fp)
    writer = LedgerWriter(rundir, folder)
    have = writer.fold.committed  # type: ignore[attr-defined]
    strays = have.difference(committed)  # range arithmetic: O(ranges), not O(shards)
    if strays:
        log.warning("%s: the ledger records shard %d, whose _done marker is gone; rebuilding it from the "
                    "markers", rundir.url(folder), next(iter(strays)))
        writer = LedgerWriter(rundir, folder, fresh=True)
        have = ShardRanges()
    missing = list(committed.difference(have))
    if missing:
        if have:
            log.info("%s: adding %d commits the ledger missed (a run that stopped before its last flush)",
                     rundir.url(folder), len(missing))
        writer.append(records_from_markers(rundir, stage, fp, missing))
        with_retries(writer.flush, what=f"write {rundir.url(folder)} ledger")
    with_retries(writer.ensure, what=f"write {rundir.url(folder)} ledger")
    return writer


def committed_shas(rundir: RunDir, stage: str, fp: str, wanted: ShardRanges) -> dict[int, str]:
    """shard -> sha256 of the output file of each `wanted` shard the stage's ledger records, reading its
    segments in order (O(shards / 1000) objects): what the publisher checks a final shard against, for
    compose shards committed by earlier runs."""
    out: dict[int, str] = {}
    n = 0
    while len(out) < len(wanted):
        records = read_segment(rundir, ledger_folder(stage, fp), n)
        if records is None:
            break
        for rec in records:
            shard = rec.get("shard")
            meta = (rec.get("files") or {}).get(f"{shard_name(shard)}.parquet") if isinstance(shard, int) else None
            if meta and shard in wanted:
                out[shard] = meta["sha256"]
        n += 1
    return out


def open_ledgers(plan: Any) -> dict[str, LedgerWriter]:
    """Every planned stage's ledger, reconciled with what `build_plan` listed (`StagePlan.committed`)."""
    return {s.name: open_ledger(plan.rundir, s.name, s.fingerprint, s.committed) for s in plan.stages}


def clean_leftovers(plan: Any, ledgers: Mapping[str, LedgerWriter]) -> dict[str, list[str]]:
    """Remove the files of uncommitted shards that the last run had in flight or saw fail, per stage;
    returns the paths removed."""
    rundir: RunDir = plan.rundir
    previous = read_progress(rundir) or {}
    before = previous.get("stages") or {}
    removed: dict[str, list[str]] = {}
    for s in plan.stages:
        if not s.selected:
            continue
        suspects = ShardRanges()
        seen = before.get(s.name) or {}
        if seen.get("fingerprint") == s.fingerprint:
            suspects.update(ShardRanges.parse(seen.get("inflight") or ""))
        fold: StageFold = ledgers[s.name].fold  # type: ignore[assignment]
        suspects.update(fold.failed)
        paths = [rundir.shard_path(s.name, s.fingerprint, shard, suffix)
                 for shard in suspects if shard not in s.committed for suffix in SHARD_FILES]
        gone = [p for p in paths if rundir.fs.exists(p)]
        if gone:
            rundir.fs.rm(gone)
            log.info("stage %s: removed %d files of shards an earlier run left uncommitted", s.name, len(gone))
        removed[s.name] = gone
    return removed


# --- during a run ----------------------------------------------------------------------------------------
class Bookkeeper:
    """The thread that writes markers, ledger records and progress.json for the scheduling loop."""

    def __init__(self, rundir: RunDir, ledgers: Mapping[str, LedgerWriter], *, stage_order: list[str],
                 fingerprints: Mapping[str, str], view: Mapping[str, Any] | None = None,
                 flush_s: float | None = None, progress_s: float | None = None):
        self.rundir = rundir
        self.ledgers = dict(ledgers)
        self.order = {name: i for i, name in enumerate(stage_order)}
        self.fingerprints = dict(fingerprints)
        self.flush_s = FLUSH_S if flush_s is None else flush_s  # read at construction: tests may set FLUSH_S
        self.progress_s = PROGRESS_S if progress_s is None else progress_s
        self._queue: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._events: list[CommitEvent] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._view: dict[str, Any] = dict(view or {})
        self._view_dirty = True
        self._outstanding = 0  # commits handed over and not yet reported
        self._broken: set[tuple[str, int]] = set()  # (stage, shard) whose marker could not be written
        self._closing: str | None = None
        self._aborted = False
        self._error: BaseException | None = None
        self._last_flush = self._last_progress = 0.0
        self.writes = 0  # objects written by this thread (markers, ledger segments, progress)
        # progress.json says `running` before this run's first marker: a `finished` one lets the next run
        # take committed shards from the ledgers without listing `_done/` (`build_plan`), which only holds
        # while nothing wrote after it. Not written: the run does not start.
        self._flush(time.monotonic(), force_progress=True, strict=True)
        self._thread = threading.Thread(target=self._run, name="grit-bookkeeping", daemon=True)
        self._thread.start()

    # --- the loop's side -------------------------------------------------------------------------
    def commit(self, stage: str, shard: int, marker: Mapping[str, Any], stats: Mapping[str, Any]) -> None:
        """Queue the `_done` marker of `shard` at `stage` (its files are written); `events` reports it."""
        with self._lock:
            self._outstanding += 1
        self._queue.put(("commit", stage, shard, dict(marker), dict(stats)))

    def fail(self, stage: str, shard: int, record: Mapping[str, Any]) -> None:
        """Queue a failure record for `stage`'s ledger (the shard failed there; no marker)."""
        if stage in self.ledgers:
            self._queue.put(("fail", stage, shard, dict(record)))

    def set_view(self, **view: Any) -> None:
        """What progress.json says about the loop (in-flight shards, counts); written at the next flush."""
        with self._lock:
            self._view.update(view)
            self._view_dirty = True

    def events(self) -> list[CommitEvent]:
        with self._lock:
            out, self._events = self._events, []
        return out

    @property
    def outstanding(self) -> int:
        """Commits handed over whose event has not been taken by `events` yet."""
        with self._lock:
            return self._outstanding + len(self._events)

    def wait(self, timeout: float) -> None:
        """Block until an event is ready (or `timeout`)."""
        with self._wake:
            if not self._events:
                self._wake.wait(timeout)

    def close(self, state: str = "finished") -> None:
        """Write everything queued, flush the ledgers and progress.json (`state`), stop the thread."""
        self._closing = state
        self._queue.put(("wake",))
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop at once and write nothing more (the run directory is someone else's now)."""
        self._aborted = True
        self._queue.put(("wake",))
        self._thread.join()

    def folds(self) -> dict[str, StageFold]:
        """Each stage's fold as written so far (call after `close`)."""
        return {name: w.fold for name, w in self.ledgers.items()}  # type: ignore[misc]

    # --- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._aborted:
                items = self._take(0.2)
                if self._aborted:
                    return
                if items:
                    self._write(items)
                now = time.monotonic()
                closing = self._closing is not None and self._queue.empty()
                if closing or now - self._last_flush >= self.flush_s:
                    self._flush(now, force_progress=closing)
                if closing:
                    return
        except BaseException as e:  # noqa: BLE001 - reported by close(); the loop sees no more events
            log.error("bookkeeping stopped: %s: %s", type(e).__name__, e)
            self._error = e
            with self._wake:
                self._wake.notify_all()

    def _take(self, timeout: float) -> list[tuple]:
        items = []
        try:
            items.append(self._queue.get(timeout=timeout))
            while True:
                items.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return [i for i in items if i[0] != "wake"]

    def _write(self, items: list[tuple]) -> None:
        commits = sorted((i for i in items if i[0] == "commit"), key=lambda i: self.order.get(i[1], 0))
        events: list[CommitEvent] = []
        by_stage: dict[str, list[tuple]] = {}
        for item in commits:
            by_stage.setdefault(item[1], []).append(item)
        for stage, group in by_stage.items():  # earlier stages first
            fp = self.fingerprints[stage]
            todo = []
            for _, _, shard, marker, stats in group:
                if (stage, shard) in self._broken or any((s, shard) in self._broken for s in self.order
                                                         if self.order[s] < self.order[stage]):
                    self._broken.add((stage, shard))
                    events.append(CommitEvent(stage, shard, "an earlier stage of this shard was not committed"))
                    continue
                todo.append((shard, marker, stats))
            for shard, error in self._put_markers(stage, fp, todo).items():
                if error is not None:
                    self._broken.add((stage, shard))
                events.append(CommitEvent(stage, shard, error))
            now = round(time.time(), 3)
            self.ledgers[stage].append(commit_record(m, st, now) for shard, m, st in todo
                                       if (stage, shard) not in self._broken)
        for _, stage, shard, record in (i for i in items if i[0] == "fail"):
            self.ledgers[stage].append([{**record, "shard": shard, "time": round(time.time(), 3)}])
        with self._wake:
            self._events.extend(events)
            self._outstanding -= len(events)
            self._wake.notify_all()

    def _put_markers(self, stage: str, fp: str, todo: list[tuple]) -> dict[int, str | None]:
        """Write the markers of `todo` (one batch of concurrent PUTs; one by one if the batch fails, so
        one bad write fails only its shard). {shard: None or the error}."""
        if not todo:
            return {}
        blobs = {self.rundir.marker_path(stage, fp, shard): json_bytes(marker) for shard, marker, _ in todo}
        try:
            with_retries(lambda: self.rundir.put_many(blobs), what=f"write {len(blobs)} {stage} markers")
            self.writes += len(blobs)
            return {shard: None for shard, _, _ in todo}
        except OSError:
            pass
        out: dict[int, str | None] = {}
        for shard, marker, _ in todo:
            try:
                with_retries(lambda s=shard, m=marker: self.rundir.write_marker(stage, fp, s, m),
                             what=f"write the {stage} marker of {shard_name(shard)}")
                self.writes += 1
                out[shard] = None
            except OSError as e:
                out[shard] = f"cannot commit shard {shard} under {self.rundir.uri}: {e}"
        return out

    def _flush(self, now: float, force_progress: bool = False, strict: bool = False) -> None:
        moved = False
        for name, writer in self.ledgers.items():
            try:
                n = with_retries(writer.flush, what=f"write the {name} ledger")
            except OSError as e:  # the markers are the truth: the next run catches the ledger up
                log.warning("cannot write the %s ledger (%s); the next run rebuilds it from the markers", name, e)
                continue
            self.writes += n
            moved |= n > 0
        self._last_flush = now
        with self._lock:
            dirty = self._view_dirty
            view = dict(self._view)
            self._view_dirty = False
        if force_progress or moved or dirty or now - self._last_progress >= self.progress_s:
            stages = view.pop("stages", {})
            doc = {**view, "written": round(time.time(), 3), "state": self._closing or "running",
                   "stages": {name: {"fingerprint": self.fingerprints.get(name), **stages.get(name, {}),
                                     "ledger": list(w.position)} for name, w in self.ledgers.items()}}
            try:
                with_retries(lambda: write_progress(self.rundir, doc), what="write progress.json")
                self.writes += 1
            except OSError as e:
                if strict:
                    raise
                log.warning("cannot write progress.json (%s)", e)
            self._last_progress = now
