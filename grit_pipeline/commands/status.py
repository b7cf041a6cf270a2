"""How far a run is, read from its run directory alone (`grit status RUN`, from any terminal or machine).

    status = run_status(RunDir("s3://bucket/runs/laion"), window_s=600)
    status["stages"][2]   # {"stage": "detect", "committed": 812, "failed": 3, "pending": 4185, ...}

Per stage (in `run.yaml`'s order, at its fingerprints): committed shards, failed shards (failed and not
committed since), shards in flight, pending shards (planned - committed - failed, where planned is
`run.yaml`'s `planned_shards` less the shards that failed at an earlier stage, which never reach this
one), rows in and out so far, throughput over the last `window_s` (shards and input rows per minute, over
the window or the time since the run started if shorter) and the time its pending shards need at that
rate. The run's ETA is the slowest stage's. Also: final shards published, the latest failures, the log
files, and the lease (holder, heartbeat age, live or not).

**What it reads.** The stages' ledgers (`grit_pipeline.rundir.ledger`: a summary and the open segment
each), the publish ledger (final shards) and `progress.json` (in flight; where each ledger stands), plus `run.yaml`, the lease and the
`logs/` listing: a few dozen objects whatever the run's size, never one per shard. `StatusReader` keeps
what it read, so a `--watch` refresh reads `progress.json`, the lease and only the ledgers that moved.
Commit times are the driver's clock, put on the store's clock by comparing `progress.json`'s `written`
with its store-side modification time, so the reader's clock does not matter where the store reports one.

A stage without a ledger (a run directory from before ledgers) is read the old way: one listing of its
`_done/`, every marker, and `failures.jsonl`. `grit status --rebuild` writes the missing ledgers (when no
run holds the lease), so the next status is cheap; `grit run` does the same at its start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from grit_pipeline.engine.bookkeeping import open_ledger
from grit_pipeline.engine.publish import PUBLISH, PublishFold
from grit_pipeline.errors import UserError
from grit_pipeline.rundir.lease import lease_and_clock, utc_iso
from grit_pipeline.rundir.ledger import LedgerReader, StageFold, ledger_folder
from grit_pipeline.rundir.progress import read_progress
from grit_pipeline.rundir.runlog import log_files, read_failures
from grit_pipeline.rundir.store import NotARun, RunDir, entry_mtime
from grit_pipeline.shard_ranges import ShardRanges

LATEST_FAILURES = 5


@dataclass
class _StageView:
    """What status knows of one stage, from its ledger or (no ledger) its markers."""

    committed: ShardRanges
    failed: ShardRanges
    rows_in: int
    rows_out: int
    failures: int  # failure records
    latest_failures: list[dict[str, Any]] = field(default_factory=list)
    recent: tuple[int, int] = (0, 0)  # commits and their input rows within the window
    source: str = "ledger"


class StatusReader:
    """Reads a run's status; keeps the ledgers it has read, so that a refresh costs a few requests."""

    def __init__(self, rundir: RunDir):
        self.rundir = rundir
        self._config: dict[str, Any] | None = None
        self._started: float | None = None
        self._readers: dict[tuple[str, str], LedgerReader] = {}
        self._folds: dict[tuple[str, str], StageFold] = {}
        self._positions: dict[str, Any] = {}  # stage -> ledger position progress.json reported at our last read
        self._markers: dict[tuple[str, str, int], dict[str, Any]] = {}  # stages without a ledger
        self._logs: list[str] | None = None
        self._run_start: str | None = None
        self._published: LedgerReader | None = None

    def _read_config(self) -> None:
        """run.yaml and its store-side modification time (the run's start: `grit run` writes it first)."""
        path = self.rundir.path("run.yaml")
        self.rundir.fs.invalidate_cache(self.rundir.root)
        try:
            data = self.rundir.read_bytes(path)
            info = self.rundir.fs.info(path)
        except (FileNotFoundError, NotADirectoryError):
            raise NotARun(self.rundir.uri) from None
        self._config, self._started = self.rundir.parse_run_yaml(data), entry_mtime(info)

    def read(self, window_s: float = 600.0) -> dict[str, Any]:
        progress, progress_mtime = read_progress(self.rundir, with_mtime=True)
        fingerprints_now = {k: (v or {}).get("fingerprint") for k, v in ((progress or {}).get("stages") or {}).items()}
        config_fps = dict((self._config or {}).get("fingerprints") or {})
        run_start = (progress or {}).get("run_start")
        if self._config is None or run_start != self._run_start or (
                fingerprints_now and any(config_fps.get(k) != v for k, v in fingerprints_now.items())):
            self._read_config()  # first read, or a new run started since
            self._logs = None
            self._run_start = run_start
        config = self._config or {}
        fingerprints: dict[str, str] = dict(config.get("fingerprints") or {})
        planned = _planned(config.get("planned_shards"))
        lease, now = lease_and_clock(self.rundir)
        # commit times are the driver's clock: shift them onto the store's, which measured `now`
        offset = 0.0
        if progress and progress_mtime is not None and isinstance(progress.get("written"), (int, float)):
            offset = progress_mtime - float(progress["written"])
        elapsed = now - self._started if self._started is not None else window_s
        window = max(1.0, min(window_s, elapsed))
        stages_progress = (progress or {}).get("stages") or {}

        views: dict[str, _StageView] = {}
        legacy_failures: list[dict[str, Any]] | None = None
        for stage, fp in fingerprints.items():
            view = self._ledger_view(stage, fp, stages_progress.get(stage), now - offset, window)
            if view is None:
                if legacy_failures is None:
                    legacy_failures = read_failures(self.rundir)
                view = self._marker_view(stage, fp, legacy_failures, now, window)
            views[stage] = view

        stages = []
        blocked = ShardRanges()  # failed at an earlier stage: never reaches the later ones
        per_min = 60.0 / window
        for stage, fp in fingerprints.items():
            v = views[stage]
            inflight = ShardRanges.parse(((stages_progress.get(stage) or {}).get("inflight")) or "") if (
                progress and progress.get("state") == "running") else ShardRanges()
            if planned is not None:
                pending = len(planned.difference(v.committed).difference(v.failed).difference(blocked))
            else:
                pending = None
            shards_per_min = v.recent[0] * per_min
            if pending is None or (pending and not shards_per_min):
                eta = None  # nothing planned to compare with, or no recent commit to extrapolate from
            else:
                eta = pending / shards_per_min * 60.0 if pending else 0.0
            stages.append({
                "stage": stage, "fingerprint": fp, "committed": len(v.committed), "failed": len(v.failed),
                "pending": pending, "inflight": len(inflight), "failed_shards": list(v.failed),
                "rows_in": v.rows_in, "rows_out": v.rows_out,
                "recent_shards": v.recent[0], "shards_per_min": shards_per_min, "rows_per_min": v.recent[1] * per_min,
                "eta_s": eta, "source": v.source,
            })
            blocked.update(v.failed)

        if legacy_failures is not None and all(v.source == "markers" for v in views.values()):
            failures_total = len(legacy_failures)
            latest = [{k: f.get(k) for k in ("time", "stage", "shard", "key", "error_type", "message")}
                      for f in legacy_failures[-LATEST_FAILURES:]]
        else:
            failures_total = sum(v.failures for v in views.values())
            latest = sorted((f for v in views.values() for f in v.latest_failures), key=lambda f: str(f.get("time")))
            latest = latest[-LATEST_FAILURES:]
        if self._logs is None:
            self._logs = [self.rundir.url(p) for p in log_files(self.rundir)]
        etas = [s["eta_s"] for s in stages if s["pending"]]
        return {
            "run": self.rundir.uri,
            "now": utc_iso(now),
            "window_s": window,
            "state": (progress or {}).get("state"),
            "planned_shards": len(planned) if planned is not None else None,
            "stages": stages,
            "eta_s": (None if any(e is None for e in etas) else max(etas)) if etas else
                     (0.0 if planned is not None else None),
            "final_shards": self._final_shards(),
            "failures": failures_total,
            "latest_failures": latest,
            "logs": self._logs,
            "lease": {k: v for k, v in lease.items() if k != "token"} if lease else None,
        }

    def _final_shards(self) -> int:
        """Shards with a final file: from the publish ledger (its open segment on a refresh), or a listing
        of `grit/` for a run directory from before it."""
        if self._published is None:
            self._published = LedgerReader(self.rundir, PUBLISH, PublishFold)
        fold = self._published.read()
        if self._published.found:
            return len(fold.published())  # type: ignore[attr-defined]
        self.rundir.fs.invalidate_cache(self.rundir.path("grit"))
        return len(self.rundir.final_shards())

    # --- a stage from its ledger -------------------------------------------------------------------
    def _ledger_view(self, stage: str, fp: str, progress: dict[str, Any] | None, driver_now: float,
                     window: float) -> _StageView | None:
        key = (stage, fp)
        reader = self._readers.get(key)
        position = (progress or {}).get("ledger")
        if reader is None:
            reader = self._readers[key] = LedgerReader(self.rundir, ledger_folder(stage, fp))
        if key not in self._folds or position is None or position != self._positions.get(stage):
            fold = reader.read()
            if not reader.found:
                return None
            self._folds[key] = fold  # type: ignore[assignment]
            self._positions[stage] = position
        fold = self._folds[key]
        latest = [{"time": utc_iso(f["time"]) if isinstance(f.get("time"), (int, float)) else f.get("time"),
                   "stage": stage, "shard": f.get("shard"), "key": f.get("key"), "error_type": f.get("error_type"),
                   "message": f.get("failed")} for f in fold.latest_failures]
        return _StageView(committed=fold.committed, failed=fold.failed, rows_in=fold.rows_in, rows_out=fold.rows_out,
                          failures=fold.failures, latest_failures=latest, recent=fold.recent(driver_now, window))

    # --- a stage without a ledger: its markers ------------------------------------------------------
    def _marker_view(self, stage: str, fp: str, failures: list[dict[str, Any]], now: float,
                     window: float) -> _StageView:
        times = self.rundir.committed_times(stage, fp)
        new = [s for s in times if (stage, fp, s) not in self._markers]
        for s, marker in self.rundir.markers(stage, fp, new).items():
            self._markers[(stage, fp, s)] = marker
        markers = {s: self._markers[(stage, fp, s)] for s in times}
        failed = ShardRanges(f["shard"] for f in failures if f.get("stage") == stage and isinstance(f.get("shard"), int)
                             and f.get("fingerprint") in (None, fp) and f["shard"] not in times)
        recent = [s for s, t in times.items() if t is not None and now - t <= window]
        return _StageView(committed=ShardRanges(times), failed=failed,
                          rows_in=sum(int(m.get("rows_in", 0)) for m in markers.values()),
                          rows_out=sum(int(m.get("rows", 0)) for m in markers.values()),
                          failures=sum(1 for f in failures if f.get("stage") == stage),
                          recent=(len(recent), sum(int(markers[s].get("rows_in", 0)) for s in recent)),
                          source="markers")


def _planned(value: Any) -> ShardRanges | None:
    """`planned_shards` of run.yaml: ranges text (this engine) or a list (earlier ones)."""
    if value is None:
        return None
    if isinstance(value, list):
        return ShardRanges(int(v) for v in value)
    return ShardRanges.parse(str(value))


def run_status(rundir: RunDir, *, window_s: float = 600.0) -> dict[str, Any]:
    """The status of a run (module docstring); `NotARun` if the directory holds no run."""
    return StatusReader(rundir).read(window_s)


def rebuild_ledgers(rundir: RunDir) -> dict[str, int]:
    """Write (or bring level) every stage's ledger from its markers; {stage: shards committed}. Refuses
    while a live lease holds the run (its own start does this)."""
    lease, _ = lease_and_clock(rundir)
    if lease is not None and lease.get("live"):
        raise UserError(f"{rundir.uri} is held by a live `grit run`, which keeps its own ledgers; "
                        "run --rebuild when it has ended")
    reader = StatusReader(rundir)
    reader._read_config()
    out = {}
    for stage, fp in dict((reader._config or {}).get("fingerprints") or {}).items():
        writer = open_ledger(rundir, stage, fp, ShardRanges(rundir.committed(stage, fp)))
        out[stage] = len(writer.fold.committed)  # type: ignore[attr-defined]
    return out
