"""What stays in the run directory of every `grit run`: its log and its shard failures.

    started = run_started()                                     # one time for the lease, the log, failures
    handler = RunLogHandler(rundir, started)                    # <run>/logs/<start>.log
    logging.getLogger().addHandler(handler)
    failures = FailureLog(rundir, started)                      # <run>/failures.jsonl
    failures.record(stage="detect", shard=7, message=..., input_file=..., key=..., error_type=..., traceback=...)
    ...
    handler.close()

**The log** gets every record the driver logs, formatted like the terminal's lines by
`grit_pipeline.logs.SafeFormatter` (control characters and bidirectional overrides escaped, so a caption
in a message can neither act on a terminal nor forge a log line). On a local or mounted disk lines are
appended as they come. Object stores have no append: the handler keeps the current part's text and
rewrites the object when there is something new, at most every `flush_every_s` (5 s) and at close; a
part that reaches `part_bytes` (4 MiB) is left as it is and the log goes on in `<start>.002.log`, ...,
so a rewrite never costs more than one part. `log_files` lists a run's logs in order.

**The failure log** holds one JSON object per line per shard failure: time, run start, stage, shard,
fingerprint, input file, key where known, error type, message, traceback. It is written before `record`
returns and never rewritten: on a local or mounted disk appended to `<run>/failures.jsonl` and fsynced;
on an object store (no append) each record is a new part, `<run>/failures/<start>.<n>-<id>.jsonl`. It
keeps the failures of earlier runs: each line says which run (`run_start`) it came from. JSON escapes
every control and non-ASCII character, so the files are safe to `cat`. `read_failures` reads them back
in order, skipping a line cut short by a crash. (`grit status` does not read them: the stages' ledgers
count failures.)
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from grit_pipeline.logs import SafeFormatter
from grit_pipeline.rundir.lease import utc_iso
from grit_pipeline.rundir.store import RunDir

log = logging.getLogger(__name__)

LOGS = "logs"
FAILURES = "failures.jsonl"
FAILURE_PARTS = "failures"  # object stores: one part per record
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LOG_NAME = re.compile(r"^(\d{8}T\d{6}Z)(?:\.(\d{3,}))?\.log$")


def run_started() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def run_stamp(started: datetime) -> str:
    """The run's start as it names its log: 20250102T030405Z (UTC)."""
    return started.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _local_path(rundir: RunDir, relpath: str) -> str | None:
    """The local file behind `relpath` when the run directory is on a local or mounted disk."""
    return rundir.fs._strip_protocol(rundir.path(relpath)) if rundir.renames else None


# --- the log -------------------------------------------------------------------------------------------
class RunLogHandler(logging.Handler):
    """A logging handler writing to `<run>/logs/<start>.log` on any fsspec store (module docstring)."""

    def __init__(self, rundir: RunDir, started: datetime, *, level: int = logging.INFO,
                 flush_every_s: float = 5.0, part_bytes: int = 4 << 20, fmt: str = LOG_FORMAT):
        super().__init__(level)
        self.setFormatter(SafeFormatter(fmt))
        self.rundir = rundir
        self.stamp = run_stamp(started)
        self.part = 1
        self.flush_every_s = flush_every_s
        self.part_bytes = part_bytes
        self._local = _local_path(rundir, self.relpath)
        self._file = None
        self._buffer: list[str] = []  # object stores: the current part's lines
        self._size = 0
        self._dirty = False
        self._error_shown = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self._local is not None:
            os.makedirs(os.path.dirname(self._local), exist_ok=True)
            self._file = open(self._local, "a", encoding="utf-8")  # noqa: SIM115 - open for the run
        else:
            self._thread = threading.Thread(target=self._flush_loop, name="grit-run-log", daemon=True)
            self._thread.start()

    @property
    def relpath(self) -> str:
        suffix = "" if self.part == 1 else f".{self.part:03d}"
        return f"{LOGS}/{self.stamp}{suffix}.log"

    @property
    def url(self) -> str:
        return self.rundir.url(self.relpath)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)
            return
        with self.lock:  # type: ignore[union-attr] - logging.Handler creates it
            if self._file is not None:
                try:
                    self._file.write(line)
                    self._file.flush()
                except OSError as e:
                    self._report(e)
                return
            if self._size and self._size + len(line) > self.part_bytes:
                self._write_part()  # the full part, one last time
                self.part += 1
                self._buffer, self._size = [], 0
            self._buffer.append(line)
            self._size += len(line)
            self._dirty = True

    def _write_part(self) -> None:
        """Object stores: (re)write the current part. Called with the handler's lock held."""
        if not self._dirty:
            return
        try:
            self.rundir.put_atomic(self.rundir.path(self.relpath), "".join(self._buffer).encode("utf-8"))
            self._dirty = False
        except OSError as e:  # kept dirty: the next flush tries again
            self._report(e)

    def _report(self, e: OSError) -> None:
        if not self._error_shown:  # once: logging about the log handler from inside it would recurse
            self._error_shown = True
            sys.stderr.write(f"grit: cannot write the run log {self.url}: {e}\n")

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.flush_every_s):
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._file is not None:
                self._file.flush()
            else:
                self._write_part()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self.lock:  # type: ignore[union-attr]
            if self._file is not None:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                self._file = None
            else:
                self._write_part()
        super().close()


def log_files(rundir: RunDir) -> list[str]:
    """Paths (relative to the run) of the run's logs: by start time, then part."""
    found = []
    for name in rundir.list_names(LOGS):
        m = _LOG_NAME.match(name)
        if m:
            found.append((m.group(1), int(m.group(2) or 1), f"{LOGS}/{name}"))
    return [path for *_, path in sorted(found)]


# --- the failure log -----------------------------------------------------------------------------------
class FailureLog:
    """`<run>/failures.jsonl`: one line per shard failure, durable when `record` returns."""

    def __init__(self, rundir: RunDir, started: datetime):
        self.rundir = rundir
        self.run_start = utc_iso(started.timestamp())
        self._local = _local_path(rundir, FAILURES)
        self._lock = threading.Lock()
        self._parts = 0  # object stores: parts written by this log
        self._id = uuid.uuid4().hex[:8]
        self._stamp = run_stamp(started)

    @property
    def url(self) -> str:
        return self.rundir.url(failures_location(self.rundir))

    def record(self, *, stage: str, shard: int, message: str, fingerprint: str | None = None,
               input_file: str | None = None, key: str | None = None, error_type: str | None = None,
               traceback: str | None = None, **extra: Any) -> dict[str, Any]:
        """Append one failure (and return it as written). Raises OSError if the run directory refuses it."""
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                 "run_start": self.run_start, "stage": stage, "shard": int(shard), "fingerprint": fingerprint,
                 "input_file": input_file, "key": key, "error_type": error_type, "message": message,
                 "traceback": traceback, **extra}
        line = json.dumps(entry, ensure_ascii=True, sort_keys=False) + "\n"
        with self._lock:
            if self._local is not None:
                os.makedirs(os.path.dirname(self._local), exist_ok=True)
                with open(self._local, "a", encoding="ascii") as f:
                    f.write(line)
                    f.flush()
                    os.fsync(f.fileno())
            else:
                self._parts += 1
                name = f"{self._stamp}.{self._parts:06d}-{self._id}.jsonl"
                self.rundir.put_atomic(self.rundir.path(FAILURE_PARTS, name), line.encode("ascii"))
        return entry


def failures_location(rundir: RunDir) -> str:
    """Where the run's failures are, relative to the run: `failures.jsonl` on a disk, `failures/` (parts)
    on an object store."""
    return FAILURES if rundir.renames else f"{FAILURE_PARTS}/"


def read_failures(rundir: RunDir) -> list[dict[str, Any]]:
    """Every failure recorded in the run directory, oldest first (empty if none): `failures.jsonl`, then
    the parts in `failures/` by name (run start, then order)."""
    texts: list[tuple[str, str]] = []
    try:
        texts.append((FAILURES, rundir.read_bytes(rundir.path(FAILURES)).decode("utf-8", errors="replace")))
    except FileNotFoundError:
        pass
    parts = sorted(n for n in rundir.list_names(FAILURE_PARTS) if n.endswith(".jsonl"))
    blobs = rundir.cat_many({i: rundir.path(FAILURE_PARTS, n) for i, n in enumerate(parts)}, missing_ok=True)
    texts.extend((f"{FAILURE_PARTS}/{parts[i]}", blobs[i].decode("utf-8", errors="replace")) for i in sorted(blobs))
    out = []
    for relpath, text in texts:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                log.warning("%s line %d is not JSON (cut short by a crash?); skipped", rundir.url(relpath), n)
                continue
            if isinstance(entry, Mapping):
                out.append(dict(entry))
    return out
