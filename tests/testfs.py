"""Filesystems that misbehave on purpose, for the engine's fault tests; registered in the test process and
in every Ray worker of the test session (`register`, run by the session Ray's worker setup hook).

- `flaky://` is the local disk, except that opening a file whose path contains a rule's text raises
  `ConnectionResetError` the first N times (across all processes). Rules are files in the folder named
  by `GRIT_TEST_FLAKY_DIR`: `<name>.rule` holds `<text>\\t<failures>`; every injected failure appends a
  line to `<name>.hits`.
- `fulldisk://` is the local disk, except that writing a file whose path ends with the `target` storage
  option writes half of it and fails with ENOSPC, as a disk that fills up in the middle of a write.
- `crashy://` is the local disk as an object store, except that in a process whose environment sets
  `GRIT_TEST_CRASH="<text>[*<text>...]:<n>"` the n-th write of a file whose path contains every text kills
  that process (SIGKILL) before the write: a driver dying in the middle of its bookkeeping.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

FLAKY_DIR_ENV = "GRIT_TEST_FLAKY_DIR"
CRASH_ENV = "GRIT_TEST_CRASH"


class _ObjectStoreStandIn(LocalFileSystem):
    """The local disk under another protocol, so the engine treats it as an object store (one PUT per file,
    no rename); unlike a real object store it needs folders, which `pipe_file` makes."""

    root_marker = "/"

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for protocol in cls.protocol:
            if path.startswith(f"{protocol}://"):
                path = path[len(protocol) + 3:]
        return LocalFileSystem._strip_protocol(path)

    def unstrip_protocol(self, name: str) -> str:
        return f"{self.protocol[0]}://{self._strip_protocol(name)}"

    def pipe_file(self, path, value, **kwargs):
        Path(self._strip_protocol(path)).parent.mkdir(parents=True, exist_ok=True)
        return super().pipe_file(path, value, **kwargs)


class FlakyFileSystem(_ObjectStoreStandIn):
    protocol = ("flaky",)

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode:
            _maybe_fail(str(path))
        return super()._open(path, mode=mode, **kwargs)


def _maybe_fail(path: str) -> None:
    folder = os.environ.get(FLAKY_DIR_ENV)
    if not folder or not Path(folder).is_dir():
        return
    for rule in sorted(Path(folder).glob("*.rule")):
        text, failures = rule.read_text().rsplit("\t", 1)
        if text not in path:
            continue
        hits = rule.with_suffix(".hits")
        for n in range(int(failures)):  # claim failure slot n, once across processes
            try:
                fd = os.open(f"{hits}.{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.close(fd)
            with open(hits, "a") as f:
                f.write(f"{os.getpid()} {path}\n")
            raise ConnectionResetError(errno.ECONNRESET, "connection reset by peer (injected)", path)


def add_flaky_rule(name: str, text: str, failures: int = 1) -> Path:
    """Make the next `failures` opens of paths containing `text` fail; returns the hits file."""
    folder = Path(os.environ[FLAKY_DIR_ENV])
    (folder / f"{name}.rule").write_text(f"{text}\t{failures}")
    return folder / f"{name}.hits"


class FullDiskFileSystem(_ObjectStoreStandIn):
    protocol = ("fulldisk",)

    def __init__(self, target: str = "", **kwargs):
        super().__init__(**kwargs)
        self.target = target

    def pipe_file(self, path, value, **kwargs):
        if self.target and str(path).endswith(self.target):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(value[: len(value) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return super().pipe_file(path, value, **kwargs)


class CrashyFileSystem(_ObjectStoreStandIn):
    protocol = ("crashy",)
    writes = 0  # matching writes so far in this process

    def pipe_file(self, path, value, **kwargs):
        rule = os.environ.get(CRASH_ENV)
        if rule:
            texts, n = rule.rsplit(":", 1)
            if all(t in str(path) for t in texts.split("*")):
                CrashyFileSystem.writes += 1
                if CrashyFileSystem.writes == int(n):
                    os.kill(os.getpid(), signal.SIGKILL)
        return super().pipe_file(path, value, **kwargs)


def register() -> None:
    """Register the test filesystems in this process (the Ray worker setup hook calls it too)."""
    import fsspec

    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    fsspec.register_implementation("fulldisk", FullDiskFileSystem, clobber=True)
    fsspec.register_implementation("crashy", CrashyFileSystem, clobber=True)
