"""Fault injection for the reliability tests: stages that stop at a kill point, and a killer that kills them.

A *killable* stage is a subclass of a real stage (same `name`, `version` and config, so the same
fingerprint and the same output) whose `process_batch` first calls `kill_point`. At its kill point the
worker process writes its PID (`os.getpid()`) to `<control>/<stage>.pid` and waits; the test kills that
process (`Killer`, or by hand), after writing `<control>/<stage>.killed` so that the worker Ray starts in
its place goes straight through. The worker never leaves the kill point by itself within `timeout`, so the
kill always lands in the middle of a `process_batch` call.

`after_commits`: stop only once that many shards of the stage are committed (`_done` markers under the
stage's fingerprint), so that a kill leaves some shards committed and others in flight. `delay` slows
every batch down so that commits and batches interleave.

A disk that fills up mid-write is `tests/testfs.py`'s `fulldisk://` filesystem.

Ray ships these classes to its workers by value (`ship_by_value`): this folder is not on their path.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from stages.base import Stage


def ship_by_value() -> None:
    """Make Ray pickle this module's classes and functions by value (workers cannot import it)."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def kill_point(control: str, stage: str, *, after_commits: int = 0, done_dir: str | None = None,
               delay: float = 0.0, timeout: float = 300.0) -> None:
    """Called at the start of every `process_batch` of a killable stage (module docstring)."""
    control_dir = Path(control)
    if delay:
        time.sleep(delay)
    if (control_dir / f"{stage}.killed").exists():
        return
    if after_commits and (done_dir is None or not Path(done_dir).is_dir()
                          or len(os.listdir(done_dir)) < after_commits):
        return
    tmp = control_dir / f"{stage}.pid.{os.getpid()}"
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, control_dir / f"{stage}.pid")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
    raise RuntimeError(f"{stage}: waited {timeout:g} s at the kill point and nobody killed this worker")


def killable(base: type[Stage], control: str | Path, **point) -> type[Stage]:
    """A subclass of `base` whose batches pass `kill_point(control, base.name, **point)` first."""
    control = str(control)

    def process_batch(self, table):
        kill_point(control, base.name, **point)
        return base.process_batch(self, table)

    return type(f"Killable{base.__name__}", (base,), {"process_batch": process_batch, "__module__": __name__})


class Killer(threading.Thread):
    """Kills, once each, the worker that reaches the kill point of each of `stages` (SIGKILL)."""

    def __init__(self, control: str | Path, stages: list[str], poll: float = 0.05):
        super().__init__(daemon=True)
        self.control = Path(control)
        self.pending = list(stages)
        self.killed: dict[str, int] = {}  # stage -> PID killed
        self.poll = poll
        self._halt = threading.Event()

    def run(self) -> None:
        while self.pending and not self._halt.is_set():
            for stage in list(self.pending):
                pid_file = self.control / f"{stage}.pid"
                if pid_file.exists():
                    pid = int(pid_file.read_text())
                    (self.control / f"{stage}.killed").write_text(str(pid))
                    os.kill(pid, signal.SIGKILL)
                    self.killed[stage] = pid
                    self.pending.remove(stage)
            time.sleep(self.poll)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.1):
    """Poll `predicate` until it returns something truthy; AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
