"""ListObjectsV2 for the benchmarks' moto server at the cost AWS's has: a page from a sorted index of the
bucket's key names, not a scan of the whole bucket.

moto 5 answers every page of a listing by walking every key of the bucket, sorting the matches and
scanning to the continuation token (`S3Backend.list_objects_v2`): one page of `_done/` costs O(bucket), so
listing the 500,000 markers of a finished 100,000-shard run takes moto about 2.5 s per page of 1,000, an
artefact of the test server that AWS does not have. `install(backend)` replaces that method of one moto
backend with one that answers the same pages (same keys and common prefixes, in the same order, the same
truncation and continuation tokens) from a sorted list of the bucket's key names, rebuilt after any write
(`touch()`, called by the server for every request that is not a GET or HEAD). moto still parses the
request, serializes the XML and does everything else; only the page lookup changes.

`tests/test_bench_scripts.py` checks the pages against moto's own on a bucket of mixed prefixes, folders,
deleted keys and page sizes.
"""

from __future__ import annotations

import bisect
import threading
from typing import Any

_lock = threading.Lock()
_generation = 0  # bumped by every write request; an index older than this is rebuilt
_indexes: dict[str, tuple[int, list[str]]] = {}  # bucket -> (generation, sorted live key names)


def touch() -> None:
    """The bucket contents may have changed (a PUT, POST or DELETE reached the server)."""
    global _generation
    with _lock:
        _generation += 1


def _names(bucket: Any) -> list[str]:
    from moto.s3.models import FakeDeleteMarker

    with _lock:
        generation = _generation
        cached = _indexes.get(bucket.name)
        if cached is not None and cached[0] == generation:
            return cached[1]
    names = sorted(name for name, key in bucket.keys.items() if not isinstance(key, FakeDeleteMarker))
    with _lock:
        _indexes[bucket.name] = (generation, names)
    return names


def install(backend: Any) -> None:
    """Answer `backend.list_objects_v2` from the sorted index (one moto S3 backend, e.g. the default
    account's `s3_backends[DEFAULT_ACCOUNT_ID]["aws"]`)."""
    original = backend.list_objects_v2

    def list_objects_v2(bucket: Any, prefix: str | None, delimiter: str | None, continuation_token: str | None,
                        start_after: str | None, max_keys: int) -> tuple[list[Any], bool, str | None]:
        from moto.s3.models import FakeTableStorageBucket

        if isinstance(bucket, FakeTableStorageBucket):
            return original(bucket, prefix, delimiter, continuation_token, start_after, max_keys)
        prefix = prefix or ""
        after = backend._pagination_tokens.get(continuation_token) if continuation_token else start_after
        names = _names(bucket)
        i = bisect.bisect_left(names, prefix)
        if after is not None:
            i = max(i, bisect.bisect_right(names, after))
        if max_keys == 0:
            return [], False, None
        out: list[Any] = []
        truncated = False
        while i < len(names) and names[i].startswith(prefix):
            rest = names[i][len(prefix):]
            if delimiter and delimiter in rest:
                entry: Any = prefix + rest.split(delimiter)[0] + delimiter  # a common prefix ("folder")
                nxt = bisect.bisect_left(names, entry + "\U0010ffff", i)  # past its keys, as AWS skips them
                if after is not None and entry <= after:  # returned on an earlier page
                    i = nxt
                    continue
            else:
                entry, nxt = bucket.keys[names[i]], i + 1
            if len(out) == max_keys:  # one more entry exists: the page is truncated
                truncated = True
                break
            out.append(entry)
            i = nxt
        if not truncated:
            return out, False, None
        return backend._truncate_result([*out, None], max_keys)  # moto's own token for the page's last entry

    backend.list_objects_v2 = list_objects_v2

