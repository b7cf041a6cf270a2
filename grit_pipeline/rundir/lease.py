"""The run lease: one `grit run` writes into a run directory at a time.

`grit run` takes the lease before it touches the run directory and holds it to the end:

    lease = Lease.acquire(rundir, stale_after_s=run.lease_stale_s, command="grit run ...")  # or LeaseHeld
    lease.start_heartbeat(on_lost=scheduler.request_stop)   # refreshes `heartbeat` every 30 s
    ...
    lease.release()                                          # deletes the lease, if still ours

The lease is `<run>/lease.json`: host, pid, user, start time, heartbeat time, command, a random token,
and the holder's `stale_after_s`. It is created only if absent, refreshed and deleted only if unchanged
since its holder last wrote it (`grit_pipeline.rundir.conditional_write`: exact on local and NFS disks and on S3,
best effort elsewhere). A second `grit run` meets a live lease and gets `LeaseHeld`, whose message names
the holder and its heartbeat's age. A lease whose heartbeat is older than the newcomer's `stale_after_s`
is taken over with a warning, as is one left on this very machine by a process that no longer exists.
A takeover replaces exactly the stale lease that was read, so of several runs taking over at once one
wins and the others see its fresh lease; a holder that comes back to life finds someone else's token at
its next heartbeat (`LeaseLost`) and must stop writing.

Heartbeat age: the lease file's store-side modification time (file mtime, S3 `LastModified`) against the
store's own clock where it reports one (S3's `Date`), else this machine's, so a writer with a wrong clock
cannot make its lease look fresh or stale. Only where the store keeps no modification time is the age
taken from the `heartbeat` field the holder wrote (`clock: "writer"` in `read_lease`).

`grit plan`, `report`, `inspect`, `stats`, `validate` and `status` never take the lease; `read_lease` only reads.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from grit_pipeline.rundir.conditional_write import ConditionalFile, Conflict, Stamped, conditional_file
from grit_pipeline.rundir.store import RunDir, json_bytes
from schemas.display import display_text

log = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
HEARTBEAT_S = 30.0  # default refresh interval (at most a quarter of stale_after_s)


class LeaseHeld(RuntimeError):
    """Another live run holds the run directory; the message names it and its heartbeat's age."""


class LeaseLost(RuntimeError):
    """Our lease was taken over (or removed): this run must stop writing into the run directory."""


def utc_iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def heartbeat_every(stale_after_s: float) -> float:
    return min(HEARTBEAT_S, stale_after_s / 4)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return str(os.getuid())


def _pid_namespace() -> str:
    """This process's machine and pid namespace: a pid means the same process only where these match."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _parse(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def describe_holder(doc: dict[str, Any]) -> str:
    """'host H pid P (user U, command C, started S)', escaped for a terminal."""
    if not doc:
        return "an unreadable lease"
    parts = [f"host {doc.get('host', '?')} pid {doc.get('pid', '?')}"]
    extra = [f"{k} {doc[k]}" for k in ("user", "command", "started") if doc.get(k)]
    text = parts[0] + (f" ({', '.join(extra)})" if extra else "")
    return display_text(text)


def _lease_state(stamped: Stamped, store_now: float) -> dict[str, Any]:
    """The lease document plus `age_s` (heartbeat age) and which clock measured it."""
    doc = _parse(stamped.data)
    if stamped.mtime is not None:
        age, clock = store_now - stamped.mtime, "store"
    else:
        try:
            hb = datetime.fromisoformat(str(doc.get("heartbeat", "")).replace("Z", "+00:00")).timestamp()
            age, clock = time.time() - hb, "writer"
        except ValueError:
            return {**doc, "age_s": None, "clock": None}  # no time at all: counts as stale
    return {**doc, "age_s": max(0.0, age), "clock": clock}


def read_lease(rundir: RunDir) -> dict[str, Any] | None:
    """The lease of a run directory (None if there is none), for `grit status`: the holder's fields,
    `age_s` (its heartbeat's age; None if unknown), `clock` ("store" or "writer") and `live` (age within the holder's own
    `stale_after_s`). Reads one file; takes nothing."""
    return lease_and_clock(rundir)[0]


def lease_and_clock(rundir: RunDir) -> tuple[dict[str, Any] | None, float]:
    """`read_lease` and the store's current time (epoch seconds), from the one read."""
    stamped, store_now = conditional_file(rundir, LEASE_FILE).read()
    if stamped is None:
        return None, store_now
    state = _lease_state(stamped, store_now)
    limit = state.get("stale_after_s")
    state["live"] = isinstance(limit, (int, float)) and state["age_s"] is not None and state["age_s"] <= limit
    state["path"] = rundir.url(LEASE_FILE)
    return state, store_now


class Lease:
    """A held lease. Use `Lease.acquire`; a context manager releases it."""

    def __init__(self, rundir: RunDir, file: ConditionalFile, doc: dict[str, Any], version: str,
                 stale_after_s: float):
        self.rundir = rundir
        self.file = file
        self.doc = doc
        self.version = version
        self.stale_after_s = stale_after_s
        self.lost: LeaseLost | None = None  # set by the heartbeat thread when the lease is gone
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_ok = time.monotonic()

    @property
    def token(self) -> str:
        return self.doc["token"]

    # --- taking it -----------------------------------------------------------------------------------
    @classmethod
    def acquire(cls, rundir: RunDir, *, stale_after_s: float, command: str) -> Lease:
        """Take the run directory's lease, or raise `LeaseHeld` naming the live holder."""
        file = conditional_file(rundir, LEASE_FILE)
        now = time.time()
        doc = {"host": socket.gethostname(), "pid": os.getpid(), "user": _user(), "command": command,
               "started": utc_iso(now), "heartbeat": utc_iso(now), "token": uuid.uuid4().hex,
               "stale_after_s": float(stale_after_s), "pidns": _pid_namespace()}
        data = json_bytes(doc)
        for _ in range(5):  # each retry follows a change by another process: re-read and decide again
            try:
                version = file.create(data)
                return cls._taken(rundir, file, doc, version, stale_after_s)
            except FileExistsError:
                pass
            current, store_now = file.read()
            if current is None:  # released in between
                continue
            state = _lease_state(current, store_now)
            if state.get("token") == doc["token"]:  # our create went through; its answer was lost
                return cls._taken(rundir, file, doc, current.version, stale_after_s)
            why = cls._takeover_reason(state, stale_after_s)
            if why is None:
                raise LeaseHeld(
                    f"{rundir.uri} is being written by another run: {describe_holder(state)}, "
                    f"{heartbeat_text(state)}. Wait for it to finish or stop it; a lease whose heartbeat is "
                    f"older than {stale_after_s:g} s (run.lease_stale_s) is taken over.")
            try:
                version = file.replace(data, current.version)
            except Conflict:
                continue
            log.warning("%s: took over the lease of %s: %s", rundir.uri, describe_holder(state), why)
            return cls._taken(rundir, file, doc, version, stale_after_s)
        raise LeaseHeld(f"{rundir.uri}: the lease kept changing while taking it; another run is starting "
                        "there")

    @classmethod
    def _taken(cls, rundir: RunDir, file: ConditionalFile, doc: dict[str, Any], version: str,
               stale_after_s: float) -> Lease:
        log.info("lease %s taken (%s)", rundir.url(LEASE_FILE), file.guarantee)
        return cls(rundir, file, doc, version, stale_after_s)

    @staticmethod
    def _takeover_reason(state: dict[str, Any], stale_after_s: float) -> str | None:
        """Why a lease found in place may be taken over, or None if its holder counts as alive."""
        if state["age_s"] is None or state["age_s"] > stale_after_s:
            return f"{heartbeat_text(state)} (limit {stale_after_s:g} s)"
        pid, pidns = state.get("pid"), state.get("pidns")
        if (state.get("host") == socket.gethostname() and pidns and pidns == _pid_namespace()
                and isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid)):
            return f"its process {pid} no longer exists on this machine"
        return None

    # --- holding it ----------------------------------------------------------------------------------
    def heartbeat(self) -> None:
        """Refresh the heartbeat time; `LeaseLost` if someone else holds the lease now."""
        with self._lock:
            if self.lost is not None:
                raise self.lost
            doc = {**self.doc, "heartbeat": utc_iso(time.time())}
            try:
                self.version = self.file.replace(json_bytes(doc), self.version)
            except Conflict:
                current, store_now = self.file.read()
                if current is None or _parse(current.data).get("token") != self.token:
                    what = (f"taken over; it is now held by {describe_holder(_lease_state(current, store_now))}"
                            if current is not None else "removed by someone else")
                    self.lost = LeaseLost(f"{self.rundir.uri}: the lease was {what}. This run must stop writing "
                                          "there.")
                    raise self.lost from None
                self.version = current.version  # our last write went through but its answer was lost
                self.version = self.file.replace(json_bytes(doc), self.version)
            self.doc = doc
            self._last_ok = time.monotonic()

    def start_heartbeat(self, every_s: float | None = None,
                        on_lost: Callable[[LeaseLost], None] | None = None) -> None:
        """Refresh the heartbeat in a daemon thread. If the lease is lost (taken over, or not refreshed for
        `stale_after_s` because the store kept failing), `lost` is set and `on_lost` is called once."""
        every = every_s or heartbeat_every(self.stale_after_s)

        def loop() -> None:
            while not self._stop.wait(every):
                try:
                    self.heartbeat()
                except LeaseLost as e:
                    log.error("%s", e)
                    break
                except (OSError, Conflict) as e:  # a store hiccup or a race: again next time, unless too long passed
                    silent = time.monotonic() - self._last_ok
                    log.warning("lease heartbeat failed (%s); last refresh %.0f s ago", e, silent)
                    if silent > self.stale_after_s:
                        self.lost = LeaseLost(f"{self.rundir.uri}: the lease could not be refreshed for "
                                              f"{silent:.0f} s (limit {self.stale_after_s:g} s); another run "
                                              "may have taken it over. This run must stop writing there.")
                        log.error("%s", self.lost)
                        break
            if self.lost is not None and on_lost is not None:
                on_lost(self.lost)

        self._thread = threading.Thread(target=loop, name="grit-lease-heartbeat", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise `LeaseLost` if the heartbeat thread found the lease gone."""
        if self.lost is not None:
            raise self.lost

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def release(self) -> None:
        """Stop the heartbeat and delete the lease, if it is still ours (a taken-over lease is left alone)."""
        self.stop_heartbeat()
        with self._lock:
            try:
                try:
                    self.file.delete(self.version)
                except Conflict:
                    current, store_now = self.file.read()
                    if current is not None and _parse(current.data).get("token") == self.token:
                        self.file.delete(current.version)
                    elif current is not None:
                        log.warning("%s: not releasing the lease: it is held by %s now", self.rundir.uri,
                                    describe_holder(_lease_state(current, store_now)))
            except (Conflict, OSError) as e:  # left in place, it goes stale and is taken over
                log.warning("%s: could not release the lease (%s); it is taken over once %g s old",
                            self.rundir.uri, e, self.stale_after_s)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def age_text(seconds: float) -> str:
    """12 s, 7 min, 3.5 h."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def heartbeat_text(state: dict[str, Any]) -> str:
    """'last heartbeat 12 s ago' (or 'no readable heartbeat') for a lease state with `age_s`."""
    age = state.get("age_s")
    return "no readable heartbeat" if age is None else f"last heartbeat {age_text(age)} ago"
