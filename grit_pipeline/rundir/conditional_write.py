"""Compare-and-swap on one small file of a run directory: the primitive under the run lease
(`grit_pipeline.rundir.lease`), on local disk and object storage alike.

    f = conditional_file(rundir, "lease.json")
    version = f.create(data)                 # FileExistsError if the file exists
    version = f.replace(new, version)        # Conflict unless the file is still at `version`
    f.delete(version)                        # Conflict likewise
    current, store_now = f.read()            # Stamped(data, version, mtime) or None; the store's clock

How exact each operation is depends on what the store offers (`guarantee` says it in words):

- **local disk** (and NFS, where Linux implements `flock` with POSIX locks): every read-check-write runs
  under an exclusive `flock` on `<file>.lock`, writes go to a temporary file renamed into place (readers
  that take no lock see the old or the new file, whole). Exact between processes. `version` is the
  sha256 of the bytes.
- **S3** (s3fs): `PutObject` with `If-None-Match: *` creates only if absent, `If-Match: <ETag>` replaces or
  deletes only what was read; `version` is the ETag. Exact, as AWS documents conditional writes. A store
  that answers with "not implemented", or silently ignores `If-None-Match` (found by re-creating a file
  just created, which must fail), is used as the next kind, with a warning.
- **anything else** (`memory://`, other object stores): check, then write, then read back after a short
  settle; two writers racing inside that window can both believe they won, and the loser finds out at
  its next compare (the lease's next heartbeat). `memory://` lives in one process, so a process-wide lock
  makes it exact there.

Times: `Stamped.mtime` is the store-side modification time where the store gives one (the file system's
mtime, S3's `LastModified`), and `read` returns the store's current time next to it (S3: the `Date` of
the response, one-second resolution; elsewhere this machine's clock, which on a local disk is the clock
that set the mtime). An age computed as `store_now - mtime` therefore does not depend on the writer's
clock, nor on the reader's where the store reports its own time.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import os
import posixpath
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from grit_pipeline.rundir.store import RunDir, entry_mtime, sha256

log = logging.getLogger(__name__)

SETTLE_S = 1.0  # check-then-write stores: how long to wait before reading a write back


class Conflict(Exception):
    """The file is not at the version the caller expected: someone else wrote or removed it."""


@dataclass(frozen=True)
class Stamped:
    data: bytes
    version: str  # ETag on S3, sha256 of the bytes elsewhere
    mtime: float | None  # store-side modification time (epoch seconds), None if the store has none



def _protocols(fs: Any) -> set[str]:
    p = fs.protocol
    return set(p if isinstance(p, (tuple, list)) else (p,))


class ConditionalFile:
    """One file of a run directory with create-if-absent / replace-if-unchanged / delete-if-unchanged."""

    guarantee = ""

    def __init__(self, rundir: RunDir, relpath: str):
        self.rundir = rundir
        self.fs = rundir.fs
        self.path = rundir.path(relpath)
        self.url = rundir.url(relpath)

    def read(self) -> tuple[Stamped | None, float]:
        raise NotImplementedError

    def create(self, data: bytes) -> str:
        raise NotImplementedError

    def replace(self, data: bytes, version: str) -> str:
        raise NotImplementedError

    def delete(self, version: str) -> None:
        raise NotImplementedError


def conditional_file(rundir: RunDir, relpath: str) -> ConditionalFile:
    """The most exact implementation the run directory's store supports (module docstring)."""
    protocols = _protocols(rundir.fs)
    if rundir.renames:
        return LockedLocalFile(rundir, relpath)
    if protocols & {"s3", "s3a"}:
        return S3ConditionalFile(rundir, relpath)
    return CheckThenWriteFile(rundir, relpath)


# --- local disk ----------------------------------------------------------------------------------------
class LockedLocalFile(ConditionalFile):
    guarantee = "exact: every change runs under an exclusive flock on the local or NFS disk"

    def __init__(self, rundir: RunDir, relpath: str):
        super().__init__(rundir, relpath)
        self.local = self.fs._strip_protocol(self.path)
        self.guard = f"{self.local}.lock"

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        os.makedirs(os.path.dirname(self.local) or ".", exist_ok=True)
        fd = os.open(self.guard, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _current(self) -> Stamped | None:
        try:
            with open(self.local, "rb") as f:
                data = f.read()
                mtime = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return Stamped(data, sha256(data), mtime)

    def _write(self, data: bytes) -> str:
        tmp = f"{self.local}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.local)
        return sha256(data)

    def read(self) -> tuple[Stamped | None, float]:
        return self._current(), time.time()  # the local clock is the one that set the mtime

    def create(self, data: bytes) -> str:
        with self._locked():
            if os.path.exists(self.local):
                raise FileExistsError(self.url)
            return self._write(data)

    def replace(self, data: bytes, version: str) -> str:
        with self._locked():
            cur = self._current()
            if cur is None or cur.version != version:
                raise Conflict(self.url)
            return self._write(data)

    def delete(self, version: str) -> None:
        with self._locked():
            cur = self._current()
            if cur is None or cur.version != version:
                raise Conflict(self.url)
            os.remove(self.local)


# --- any store: check, write, read back ------------------------------------------------------------------
_MEMORY_LOCK = threading.RLock()  # memory:// is one process's dict: a process-wide lock makes it exact


class CheckThenWriteFile(ConditionalFile):
    guarantee = ("best effort: check, write, read back after a settle; two writers racing within that "
                 "window are told apart at the next compare")

    def __init__(self, rundir: RunDir, relpath: str):
        super().__init__(rundir, relpath)
        exact = "memory" in _protocols(self.fs)
        self.lock: Any = _MEMORY_LOCK if exact else contextlib.nullcontext()
        self.settle_s = 0.0 if exact else SETTLE_S
        if exact:
            self.guarantee = "exact within the one process that holds memory:// (a process-wide lock)"

    def _current(self) -> Stamped | None:
        self.fs.invalidate_cache(posixpath.dirname(self.path))
        try:
            data = self.fs.cat_file(self.path)
            info = self.fs.info(self.path)
        except FileNotFoundError:
            return None
        return Stamped(data, sha256(data), entry_mtime(info))

    def read(self) -> tuple[Stamped | None, float]:
        return self._current(), time.time()

    def _write_checked(self, data: bytes) -> str:
        self.fs.pipe_file(self.path, data)
        return self.read_back(data)

    def read_back(self, data: bytes) -> str:
        """After a settle, the version of `data` as stored; Conflict if another writer came after us."""
        if self.settle_s:
            time.sleep(self.settle_s)
        back = self._current()
        if back is None or back.data != data:
            raise Conflict(self.url)
        return back.version

    def create(self, data: bytes) -> str:
        with self.lock:
            if self._current() is not None:
                raise FileExistsError(self.url)
            try:
                return self._write_checked(data)
            except Conflict:
                raise FileExistsError(self.url) from None

    def replace(self, data: bytes, version: str) -> str:
        with self.lock:
            cur = self._current()
            if cur is None or cur.version != version:
                raise Conflict(self.url)
            return self._write_checked(data)

    def delete(self, version: str) -> None:
        with self.lock:
            cur = self._current()
            if cur is None or cur.version != version:
                raise Conflict(self.url)
            self.fs.rm_file(self.path)
            self.fs.invalidate_cache(posixpath.dirname(self.path))


# --- S3: conditional requests ------------------------------------------------------------------------------
_UNSUPPORTED = {"NotImplemented", "InvalidArgument", "InvalidRequest", "501"}
_CONFLICT = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_MISSING = {"NoSuchKey", "404", "NotFound"}


def _client_error(exc: BaseException) -> tuple[str | None, dict[str, Any]]:
    """(error code, response) of the botocore ClientError behind an s3fs exception, if any."""
    seen = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict) and "Error" in response:
            return str(response["Error"].get("Code")), response
        seen = seen.__cause__  # type: ignore[assignment]
    return None, {}


def _response_date(response: dict[str, Any]) -> float | None:
    date = (response.get("ResponseMetadata") or {}).get("HTTPHeaders", {}).get("date")
    if not date:
        return None
    try:
        return email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return None


class S3ConditionalFile(ConditionalFile):
    guarantee = "exact: S3 conditional requests (If-None-Match to create, If-Match to replace and delete)"

    def __init__(self, rundir: RunDir, relpath: str):
        super().__init__(rundir, relpath)
        self.bucket, self.key, _ = self.fs.split_path(self.path)
        self.fallback: CheckThenWriteFile | None = None  # set when the store has no conditional requests

    def _downgrade(self, why: str) -> CheckThenWriteFile:
        if self.fallback is None:
            log.warning("%s: %s; the lease there is best effort (check, write, read back)", self.url, why)
            self.fallback = CheckThenWriteFile(self.rundir, posixpath.relpath(self.path, self.rundir.root))
            self.guarantee = self.fallback.guarantee
        return self.fallback

    def _call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        try:
            return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)
        finally:
            self.fs.invalidate_cache(self.path)  # s3fs's listing cache does not see raw calls

    def read(self) -> tuple[Stamped | None, float]:
        if self.fallback is not None:
            return self.fallback.read()

        async def get() -> tuple[dict[str, Any], bytes]:
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            body = response["Body"]
            try:
                return response, await body.read()
            finally:
                body.close()

        from fsspec.asyn import sync

        try:
            response, data = sync(self.fs.loop, get)
        except FileNotFoundError as e:
            _, err = _client_error(e)
            return None, _response_date(err) or time.time()
        modified = response.get("LastModified")
        return (Stamped(data, str(response["ETag"]), modified.timestamp() if modified else None),
                _response_date(response) or time.time())

    def create(self, data: bytes) -> str:
        if self.fallback is not None:
            return self.fallback.create(data)
        # Redundant where the store honours If-None-Match; where it silently ignores it, this is what keeps
        # a second run from overwriting a live lease before the check below finds the store out.
        try:
            self._call("head_object")
            raise FileExistsError(self.url)
        except FileNotFoundError:
            pass
        try:
            etag = self._call("put_object", Body=data, IfNoneMatch="*")["ETag"]
        except FileExistsError:
            raise
        except OSError as e:
            code, _ = _client_error(e)
            if code in _CONFLICT:  # a concurrent conditional write (409) or a plain 412
                raise FileExistsError(self.url) from None
            if code in _UNSUPPORTED:
                return self._downgrade(f"the store refuses conditional writes ({code})").create(data)
            raise
        try:  # a store that ignores If-None-Match would let this second create through
            self._call("put_object", Body=data, IfNoneMatch="*")
        except FileExistsError:
            return str(etag)
        except OSError as e:
            code, _ = _client_error(e)
            if code in _CONFLICT:
                return str(etag)
            raise
        try:  # our first write went through unconditionally: keep it only if nobody wrote after it
            return self._downgrade("the store ignores If-None-Match").read_back(data)
        except Conflict:
            raise FileExistsError(self.url) from None

    def _if_match(self, method: str, version: str, **kwargs: Any) -> tuple[bool, dict[str, Any]]:
        """`method` with If-Match: (True, response); Conflict when the file is no longer at `version`;
        (False, {}) when the store refuses If-Match, for the caller to compare by hand."""
        try:
            return True, self._call(method, IfMatch=version, **kwargs)
        except OSError as e:
            code, _ = _client_error(e)
            if code in _CONFLICT or code in _MISSING or isinstance(e, FileNotFoundError):
                raise Conflict(self.url) from None
            if code not in _UNSUPPORTED:
                raise
        cur, _ = self.read()
        if cur is None or cur.version != version:
            raise Conflict(self.url)
        return False, {}

    def replace(self, data: bytes, version: str) -> str:
        if self.fallback is not None:
            return self.fallback.replace(data, version)
        done, response = self._if_match("put_object", version, Body=data)
        if done:
            return str(response["ETag"])
        with self._downgrade("the store refuses If-Match").lock:  # compared above: write and read back
            return self.fallback._write_checked(data)  # type: ignore[union-attr]

    def delete(self, version: str) -> None:
        if self.fallback is not None:
            return self.fallback.delete(version)
        done, _ = self._if_match("delete_object", version)
        if not done:  # deletes without conditions (older S3-compatible stores): compared above
            self._call("delete_object")
