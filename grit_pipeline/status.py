"""How far a run is, read from its run directory alone (`grit status RUN`, from any terminal or machine).

    status = run_status(RunDir("s3://bucket/runs/laion"), window_s=600)
    status["stages"][2]   # {"stage": "detect", "committed": 812, "failed": 3, "pending": 4185, ...}

Per stage (in `run.yaml`'s order, at its fingerprints): committed shards (`_done` markers), failed shards
(`failures.jsonl` lines of that stage and fingerprint whose shard has not been committed since), pending
shards (planned - committed - failed, where planned is `run.yaml`'s `planned_shards:` less the shards that failed
at an earlier stage, which never reach this one), rows in and out so far (summed over the markers),
throughput over the last `window_s` (shards and input rows per minute, from the markers' store-side
modification times, over the window or the time since the run started if shorter), and the time it
needs for its pending shards at that rate. The run's ETA is the slowest stage's. Also: final shards
published, the latest failures, the log files, and the lease (holder, heartbeat age, live or not).

Cheap on a run of thousands of shards on S3: one listing of `_done/` (with details) per stage
(`RunDir.committed_times`), the markers read concurrently (`RunDir.markers`) and kept by `StatusReader`
so that `--watch` reads only new ones, no Parquet. Times are the store's (`grit_pipeline.conditional_write`),
so the reader's clock does not matter where the store reports its own.
"""

from __future__ import annotations

from typing import Any

import yaml

from grit_pipeline.conditional_write import entry_mtime
from grit_pipeline.lease import lease_and_clock, utc_iso
from grit_pipeline.rundir import RunDir
from grit_pipeline.runlog import log_files, read_failures
from grit_pipeline.summary import NotARun

LATEST_FAILURES = 5


class StatusReader:
    """Reads a run's status; keeps the markers it has read (a committed marker does not change)."""

    def __init__(self, rundir: RunDir):
        self.rundir = rundir
        self._markers: dict[tuple[str, str, int], dict[str, Any]] = {}

    def _config(self) -> tuple[dict[str, Any], float | None]:
        """run.yaml and its store-side modification time (the run's start: `grit run` writes it first)."""
        path = self.rundir.path("run.yaml")
        self.rundir.fs.invalidate_cache(self.rundir.root)
        try:
            data = self.rundir.read_bytes(path)
            info = self.rundir.fs.info(path)
        except FileNotFoundError:
            raise NotARun(f"{self.rundir.uri}: not a run directory (no run.yaml); pass the --output of a "
                          "`grit run`") from None
        return yaml.safe_load(data) or {}, entry_mtime(info)

    def _read_markers(self, stage: str, fp: str, shards: list[int]) -> dict[int, dict[str, Any]]:
        new = [s for s in shards if (stage, fp, s) not in self._markers]
        for s, marker in self.rundir.markers(stage, fp, new).items():
            self._markers[(stage, fp, s)] = marker
        return {s: self._markers[(stage, fp, s)] for s in shards}

    def read(self, window_s: float = 600.0) -> dict[str, Any]:
        config, started_mtime = self._config()
        fingerprints: dict[str, str] = dict(config.get("fingerprints") or {})
        planned = config.get("planned_shards")
        planned_set = {int(s) for s in planned} if isinstance(planned, list) else None
        lease, now = lease_and_clock(self.rundir)
        failures = read_failures(self.rundir)
        elapsed = now - started_mtime if started_mtime is not None else window_s
        window = max(1.0, min(window_s, elapsed))

        stages = []
        blocked: set[int] = set()  # failed at an earlier stage: never reaches the later ones
        for stage, fp in fingerprints.items():
            committed = self.rundir.committed_times(stage, fp)
            markers = self._read_markers(stage, fp, sorted(committed))
            failed = sorted({f["shard"] for f in failures if f.get("stage") == stage and isinstance(f.get("shard"), int)
                             and f.get("fingerprint") in (None, fp) and f["shard"] not in committed})
            recent = [s for s, t in committed.items() if t is not None and now - t <= window]
            per_min = 60.0 / window
            if planned_set is not None:
                pending = len(planned_set - set(committed) - set(failed) - blocked)
            else:
                pending = None
            shards_per_min = len(recent) * per_min
            if pending is None or (pending and not shards_per_min):
                eta = None  # nothing planned to compare with, or no recent commit to extrapolate from
            else:
                eta = pending / shards_per_min * 60.0 if pending else 0.0
            stages.append({
                "stage": stage, "fingerprint": fp, "committed": len(committed), "failed": len(failed),
                "pending": pending, "failed_shards": failed,
                "rows_in": sum(int(m.get("rows_in", 0)) for m in markers.values()),
                "rows_out": sum(int(m.get("rows", 0)) for m in markers.values()),
                "recent_shards": len(recent), "shards_per_min": shards_per_min,
                "rows_per_min": sum(int(markers[s].get("rows_in", 0)) for s in recent) * per_min,
                "eta_s": eta,
            })
            blocked |= set(failed)

        etas = [s["eta_s"] for s in stages if s["pending"]]
        for folder in ("grit", "logs"):
            self.rundir.fs.invalidate_cache(self.rundir.path(folder))
        return {
            "run": self.rundir.uri,
            "now": utc_iso(now),
            "window_s": window,
            "planned_shards": len(planned_set) if planned_set is not None else None,
            "stages": stages,
            "eta_s": (None if any(e is None for e in etas) else max(etas)) if etas else
                     (0.0 if planned_set is not None else None),
            "final_shards": len(self.rundir.final_shards()),
            "failures": len(failures),
            "latest_failures": [{k: f.get(k) for k in ("time", "stage", "shard", "key", "error_type", "message")}
                                for f in failures[-LATEST_FAILURES:]],
            "logs": [self.rundir.url(p) for p in log_files(self.rundir)],
            "lease": {k: v for k, v in lease.items() if k != "token"} if lease else None,
        }


def run_status(rundir: RunDir, *, window_s: float = 600.0) -> dict[str, Any]:
    """The status of a run (module docstring); `NotARun` if the directory holds no run."""
    return StatusReader(rundir).read(window_s)

