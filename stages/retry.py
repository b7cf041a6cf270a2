"""Retrying transient I/O: object-store timeouts, throttling, dropped connections, a flaky NFS mount.

Used wherever the pipeline reads or writes bytes it does not own (source tars and images, the run
directory): a transient error is retried with exponential backoff a bounded number of times, then
re-raised as `TransientIOError` naming what was being done, so the engine fails that shard (and a re-run
retries it) instead of rejecting rows over a network blip. Permanent errors (a missing file, a
permission refused, a path that is a folder) are never retried: they are re-raised at once.

    data = with_retries(lambda: fs.cat_file(path), what=f"read {url}")
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

ATTEMPTS = 4  # tries in all; with BASE_DELAY 0.5 s the waits are about 0.5, 1 and 2 s
BASE_DELAY = 0.5
MAX_DELAY = 8.0
# OSError(errno, ...) with ENOENT, EISDIR, ENOTDIR, EACCES/EPERM or EEXIST is created as one of these
PERMANENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)
# other OSErrors that waiting does not cure: a full disk or quota, a read-only filesystem, a bad name or
# argument (s3fs raises most S3 4xx codes as OSError(EINVAL): a malformed request, an invalid bucket name)
PERMANENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.EINVAL})
# Names of exception types (without importing botocore/aiohttp here) that object stores raise transiently,
# and S3 error codes of transient failures; IncompleteBody and BadDigest are transfers damaged on the way
# (s3fs raises them as OSError(EINVAL) from the botocore error, which carries the code).
TRANSIENT_NAMES = frozenset({
    "ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError", "ConnectionClosedError",
    "ClientPayloadError", "ServerDisconnectedError", "ServerTimeoutError", "ClientOSError",
    "ResponseStreamingError", "IncompleteReadError", "ProtocolError", "SlowDown", "Throttling",
    "ThrottlingException", "RequestTimeout", "ServiceUnavailable", "InternalError",
    "IncompleteBody", "BadDigest",
})


class TransientIOError(OSError):
    """A transient I/O error that persisted through every retry; the message says what was attempted."""


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: timeouts, connection drops, throttling, damaged transfers, other
    non-permanent OSErrors."""
    if isinstance(exc, (PERMANENT, TransientIOError)):  # TransientIOError: already retried
        return False
    code = _error_code(exc)
    if code is not None and (code in TRANSIENT_NAMES or code in ("500", "502", "503", "504")):
        return True  # before the errno test: s3fs raises e.g. IncompleteBody as OSError(EINVAL)
    if isinstance(exc, OSError) and exc.errno in PERMANENT_ERRNOS:
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    for cls in type(exc).__mro__:
        if cls.__name__ in TRANSIENT_NAMES:
            return True
    return isinstance(exc, OSError)


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError, or of the one an s3fs OSError was raised from."""
    for e in (exc, exc.__cause__ if isinstance(exc, OSError) else None):
        response = getattr(e, "response", None)  # botocore ClientError
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", "")) or None
    return None


def with_retries(fn: Callable[[], T], *, what: str, attempts: int = ATTEMPTS, base_delay: float = BASE_DELAY,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """`fn()`, retried on transient errors; after `attempts` tries raises `TransientIOError(what: ...)`."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == attempts:
                raise TransientIOError(f"{what}: {type(exc).__name__}: {exc} "
                                       f"(still failing after {attempts} tries)") from exc
            delay = min(MAX_DELAY, base_delay * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            log.warning("%s: %s: %s; retrying in %.1f s (try %d of %d)", what, type(exc).__name__, exc,
                        delay, attempt + 1, attempts)
            sleep(delay)
    raise AssertionError("unreachable")
