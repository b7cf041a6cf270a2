"""Stopping a run cleanly: the first Ctrl-C or SIGTERM stops scheduling new work and lets the work in
flight commit for up to `run.stop_grace_s` seconds; a second one stops at once. Either way nothing
half-written is visible as committed (a shard counts only once its `_done` marker is written, and markers
are written only for finished work), and `grit run` with the same arguments resumes.

    with StopSignals(on_stop=scheduler.request_stop, on_abort=scheduler.request_abort) as signals:
        scheduler.run()
    signals.received   # "SIGINT" / "SIGTERM" / None
    signals.exit_code  # 130 / 143 / None

Handlers are installed only in the main thread (a run driven from another thread, or a notebook cell run
elsewhere, keeps the process's own handlers) and the previous ones are restored on exit.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + signal number, as shells report them


class StopSignals:
    def __init__(self, on_stop: Callable[[], None], on_abort: Callable[[], None], grace_s: float = 0.0):
        self.on_stop, self.on_abort, self.grace_s = on_stop, on_abort, grace_s
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def exit_code(self) -> int | None:
        return EXIT_CODES.get(self.received) if self.received else None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            log.warning("%s: stopping: no new work; waiting up to %g s for the work in flight to commit "
                        "(%s again stops at once)", name, self.grace_s,
                        "Ctrl-C" if name == "SIGINT" else "the signal")
            self.on_stop()
        else:
            log.warning("%s again: stopping at once; what is in flight is dropped (nothing of it is committed)",
                        name)
            self.on_abort()
