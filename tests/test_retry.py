"""Transient I/O errors are retried with backoff, permanent ones are not, and the final error says what
was being done."""

from __future__ import annotations

import pytest

from stages.retry import TransientIOError, is_transient, with_retries


class Flaky:
    def __init__(self, failures: int, exc: Exception):
        self.failures, self.exc, self.calls = failures, exc, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return "data"


def test_a_transient_error_is_retried_until_it_passes():
    waits: list[float] = []
    fn = Flaky(2, TimeoutError("read timed out"))
    assert with_retries(fn, what="read s3://b/x", sleep=waits.append) == "data"
    assert fn.calls == 3 and len(waits) == 2 and waits[1] > waits[0] * 0.9


def test_a_persistent_transient_error_names_what_was_attempted():
    fn = Flaky(10, ConnectionResetError("peer reset"))
    with pytest.raises(TransientIOError, match=r"read s3://b/x: ConnectionResetError.*after 3 tries"):
        with_retries(fn, what="read s3://b/x", attempts=3, sleep=lambda s: None)
    assert fn.calls == 3


@pytest.mark.parametrize("exc", [FileNotFoundError("gone"), PermissionError("no"), ValueError("bad")])
def test_permanent_errors_are_raised_at_once(exc):
    fn = Flaky(1, exc)
    with pytest.raises(type(exc)):
        with_retries(fn, what="read", sleep=lambda s: None)
    assert fn.calls == 1


def test_object_store_throttling_is_transient():
    class ClientError(Exception):
        def __init__(self, code):
            self.response = {"Error": {"Code": code}}

    assert is_transient(ClientError("SlowDown")) and is_transient(ClientError("503"))
    assert not is_transient(ClientError("NoSuchKey"))
    assert is_transient(OSError(5, "I/O error")) and not is_transient(IsADirectoryError("dir"))
    assert not is_transient(OSError(28, "No space left on device"))  # a full disk does not empty itself


def test_a_damaged_s3_transfer_is_retried_and_other_invalid_requests_are_not():
    import errno

    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    def s3_error(code: str) -> OSError:
        return translate_boto_error(ClientError({"Error": {"Code": code, "Message": code}}, "PutObject"))

    damaged = s3_error("IncompleteBody")
    assert type(damaged) is OSError and damaged.errno == errno.EINVAL  # as s3fs raises it
    for code in ("IncompleteBody", "BadDigest"):
        fn = Flaky(1, s3_error(code))
        assert with_retries(fn, what="write s3://b/x", sleep=lambda s: None) == "data" and fn.calls == 2
    fn = Flaky(1, s3_error("InvalidBucketName"))
    with pytest.raises(OSError, match="InvalidBucketName"):
        with_retries(fn, what="write s3://b/x", sleep=lambda s: None)
    assert fn.calls == 1


@pytest.mark.parametrize("name", ["ENOENT", "EISDIR", "ENOTDIR", "EEXIST", "EACCES", "EPERM", "ENOSPC", "EDQUOT",
                                  "EROFS", "ENAMETOOLONG", "EINVAL"])
def test_an_oserror_with_a_permanent_errno_is_not_retried(name):
    import errno

    assert not is_transient(OSError(getattr(errno, name), name))  # the first six: OSError makes them subclasses
