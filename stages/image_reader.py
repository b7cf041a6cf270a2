"""Reading the encoded bytes of images: the one reader of every consumer of `image_ref` (detect's prepare
step, the trainer's image loader, the report's thumbnails and `grit inspect --png`).

A row's image is an `ImageLocation`: its `image_ref` (an fsspec URL, or `tar://<member>::<tar url>` for a
webdataset member) and, for a tar member, where its data sits in the tar (`image_offset`, `image_size`,
recorded by ingest from the tar's headers). `read_images(locations, allowed=...)`:

0. reads only references that the caller's allow-list allows (`stages.image_refs.check_refs`: never
   http(s), nothing outside the run's input and `ingest.external_images`); the others fail with the
   check's reason and detail, and nothing is requested for them;
1. refuses members larger than `max_bytes` (`image_too_large`) before reading anything;
2. groups the byte ranges by file, sorts them by offset and coalesces ranges that are adjacent or nearly
   so (gaps up to `GAP_BYTES`, requests up to `MAX_REQUEST_BYTES`), then fetches them with one
   `fs.cat_ranges` call per filesystem: one ranged request per coalesced range, concurrent on object
   stores;
3. cuts each image's bytes out of its range. A plain file is read whole, up to `max_bytes + 1` bytes.

So reading a shard batch by batch costs about the size of its images, never a re-scan of its tar. A tar
ref without a location (an older ingest output, a `url` column, a hand-written ref) is looked up in an
index of the tar's headers (`stages.tar_index`), built once per tar and kept for later calls.

Errors: a missing file, a member not in its tar, or a member beyond the end of a truncated tar is
`image_unreadable` for that row alone, the detail naming file and member. Transient errors (timeouts,
dropped connections, throttling: `stages.retry.is_transient`) are retried with backoff; when they persist,
`TransientIOError` is raised naming the file and the keys, so the engine fails the shard (naming stage and
shard) and a re-run retries it: a network blip never becomes a reject.
"""

from __future__ import annotations

import tarfile
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa

from schemas.rows import RejectReason
from stages.image_refs import TAR_PREFIX, ImageAllowList, check_refs
from stages.images import ImageFailure
from stages.retry import PERMANENT, TransientIOError, is_transient, with_retries
from stages.tar_index import TarMember, member_name, read_tar_index

DEFAULT_MAX_BYTES = 64 * 2**20  # an encoded image larger than this is refused before it is read
GAP_BYTES = 256 * 2**10  # ranges of one file at most this far apart are fetched with one request
MAX_REQUEST_BYTES = 16 * 2**20  # a coalesced request grows no larger (one image alone may be larger)
TAR_INDEXES_KEPT = 8  # header indexes of tars read through refs without a location, most recent first
UNREADABLE = RejectReason.IMAGE_UNREADABLE


@dataclass(frozen=True)
class ImageLocation:
    """Where one row's image bytes are: `ref`, and for a tar member the offset and size of its data in
    the tar (None when unknown: the tar's headers are then read). `key` only names the row in errors."""

    ref: str
    offset: int | None = None
    size: int | None = None
    key: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ImageLocation | None:
        """The location in a row's `image_ref`/`image_offset`/`image_size` columns; None without a ref."""
        ref = row.get("image_ref")
        return cls(ref, row.get("image_offset"), row.get("image_size"), row.get("key")) if ref else None


def locations_of(table: pa.Table) -> list[ImageLocation | None]:
    """One location per row of a table holding `image_ref` (and, from ingest, `image_offset`/`image_size`)."""
    n = table.num_rows

    def column(name: str) -> list:
        return table.column(name).to_pylist() if name in table.column_names else [None] * n

    return [ImageLocation(ref, offset, size, key) if ref else None for key, ref, offset, size in
            zip(column("key"), column("image_ref"), column("image_offset"), column("image_size"), strict=True)]


def split_tar_ref(ref: str) -> tuple[str, str] | None:
    """`tar://<member>::<tar url>` -> (tar url, member); None for a plain ref."""
    if not ref.startswith(TAR_PREFIX) or "::" not in ref:
        return None
    member, tar_url = ref[len(TAR_PREFIX):].split("::", 1)
    return tar_url, member_name(member)


@dataclass
class _Want:
    """The bytes one row needs: `size` bytes at `start` of `file`, or (size None) the whole file."""

    index: int  # position in the caller's list
    file: str
    start: int
    size: int | None
    member: str | None  # tar member name, for messages
    key: str | None

    def where(self) -> str:
        return f"member {self.member!r} of {self.file}" if self.member is not None else self.file


@dataclass
class _Request:
    """One ranged read, [start, end) of `file`, serving one or more wants."""

    file: str
    start: int
    end: int
    wants: list[_Want] = field(default_factory=list)


def read_images(locations: Sequence[ImageLocation | None], max_bytes: int = DEFAULT_MAX_BYTES, *,
                allowed: ImageAllowList) -> list[bytes | ImageFailure]:
    """The encoded bytes at each location, in order, or why they cannot be had (module docstring). Only
    references that `allowed` allows are read (`stages.image_refs.check_refs`); the others fail with the
    check's reason (`image_not_allowed`, `image_web_url`) without a request. Raises `TransientIOError` when
    a transient error outlasts its retries."""
    results: list[bytes | ImageFailure] = [ImageFailure(UNREADABLE, "row has no image_ref")] * len(locations)
    tar_indexes: dict[str, dict[str, TarMember] | ImageFailure] = {}
    wants: list[_Want] = []
    refusals = check_refs([loc.ref if loc is not None and loc.ref else None for loc in locations], allowed)
    for i, loc in enumerate(locations):
        if loc is None or not loc.ref:
            continue
        if refusals[i] is not None:
            results[i] = ImageFailure(refusals[i].reason, refusals[i].detail)
            continue
        located = _locate(i, loc, max_bytes, tar_indexes)
        if isinstance(located, _Want):
            wants.append(located)
        else:
            results[i] = located
    for fs, requests in _by_filesystem(_coalesce(wants, max_bytes)):
        for (request, _), blob in zip(requests, _fetch(fs, requests), strict=True):
            for want in request.wants:
                results[want.index] = _cut(request, blob, want, max_bytes)
    return results


def _too_large(where: str, size: int, max_bytes: int) -> ImageFailure:
    return ImageFailure(RejectReason.IMAGE_TOO_LARGE, f"{where}: {size} bytes > max_image_bytes {max_bytes}")


def _locate(i: int, loc: ImageLocation, max_bytes: int,
            tar_indexes: dict[str, dict[str, TarMember] | ImageFailure]) -> _Want | bytes | ImageFailure:
    """What to read for one location, or its result when nothing needs reading."""
    tar = split_tar_ref(loc.ref)
    file, member = tar if tar is not None else (loc.ref, None)
    offset, size = loc.offset, loc.size
    if tar is not None and (offset is None or size is None):
        if file not in tar_indexes:
            tar_indexes[file] = _tar_members(file, loc.key)
        index = tar_indexes[file]
        if isinstance(index, ImageFailure):
            return index
        found = index.get(member)
        if found is None:
            return ImageFailure(UNREADABLE, f"no member {member!r} in {file}")
        offset, size = found.offset, found.size
    if offset is None or size is None:
        return _Want(i, file, 0, None, None, loc.key)
    want = _Want(i, file, int(offset), int(size), member, loc.key)
    if want.start < 0 or want.size < 0:
        return ImageFailure(UNREADABLE, f"{want.where()}: bad location (offset {offset}, size {size})")
    if want.size > max_bytes:
        return _too_large(want.where(), want.size, max_bytes)
    return want if want.size > 0 else b""


# --- tars read through refs without a location ---------------------------------------------------------

_tar_index_cache: OrderedDict[str, dict[str, TarMember]] = OrderedDict()
_tar_index_lock = threading.Lock()


def _tar_members(tar_url: str, key: str | None) -> dict[str, TarMember] | ImageFailure:
    """Member name -> data location of a tar, from the cache or one scan of its headers."""
    with _tar_index_lock:
        if tar_url in _tar_index_cache:
            _tar_index_cache.move_to_end(tar_url)
            return _tar_index_cache[tar_url]
    try:
        index = {member_name(m.name): m for m in read_tar_index(tar_url)}
    except TransientIOError as exc:
        raise TransientIOError(f"{exc} (reading the image of key {key!r})") from exc
    except (tarfile.TarError, OSError, ValueError) as exc:
        return ImageFailure(UNREADABLE, f"{tar_url}: {type(exc).__name__}: {exc}"[:300])
    with _tar_index_lock:
        _tar_index_cache[tar_url] = index
        while len(_tar_index_cache) > TAR_INDEXES_KEPT:
            _tar_index_cache.popitem(last=False)
    return index


# --- planning and fetching reads ------------------------------------------------------------------------


def _coalesce(wants: list[_Want], max_bytes: int) -> list[_Request]:
    """Requests for `wants`: per file, ranges sorted by offset and merged across small gaps; every want of
    a whole plain file shares one request for its first `max_bytes + 1` bytes."""
    by_file: dict[str, list[_Want]] = defaultdict(list)
    for want in wants:
        by_file[want.file].append(want)
    requests: list[_Request] = []
    for file, file_wants in by_file.items():
        whole = [w for w in file_wants if w.size is None]
        if whole:
            requests.append(_Request(file, 0, max_bytes + 1, whole))
        current: _Request | None = None
        for want in sorted((w for w in file_wants if w.size is not None), key=lambda w: (w.start, w.index)):
            end = want.start + want.size
            if (current is not None and want.start - current.end <= GAP_BYTES
                    and max(end, current.end) - current.start <= MAX_REQUEST_BYTES):
                current.end = max(current.end, end)
                current.wants.append(want)
            else:
                current = _Request(file, want.start, end, [want])
                requests.append(current)
    return requests


def _by_filesystem(requests: list[_Request]) -> list[tuple[fsspec.AbstractFileSystem, list[tuple[_Request, str]]]]:
    """Requests grouped by the filesystem that serves them, each with its path on that filesystem."""
    groups: dict[int, tuple[fsspec.AbstractFileSystem, list[tuple[_Request, str]]]] = {}
    resolved: dict[str, tuple[fsspec.AbstractFileSystem, str]] = {}
    for request in requests:
        if request.file not in resolved:
            resolved[request.file] = fsspec.core.url_to_fs(request.file)
        fs, path = resolved[request.file]
        groups.setdefault(id(fs), (fs, []))[1].append((request, path))
    return list(groups.values())


def _fetch(fs: fsspec.AbstractFileSystem, requests: list[tuple[_Request, str]]) -> list[bytes | BaseException]:
    """The bytes of every request (or the permanent error it met), retrying those that fail transiently."""
    out: list[bytes | BaseException] = [b""] * len(requests)
    pending = list(range(len(requests)))

    def attempt() -> None:
        nonlocal pending
        got = fs.cat_ranges([requests[i][1] for i in pending], [requests[i][0].start for i in pending],
                            [requests[i][0].end for i in pending], on_error="return")
        retry: list[int] = []
        first: BaseException | None = None
        for i, blob in zip(pending, got, strict=True):
            if isinstance(blob, BaseException) and not isinstance(blob, PERMANENT):
                blob = _past_the_end(fs, requests[i][1], requests[i][0].start, blob)
            if isinstance(blob, BaseException) and is_transient(blob):
                retry.append(i)
                first = first or blob
            else:
                out[i] = blob
        pending = retry
        if first is not None:
            raise first

    files = sorted({r.file for r, _ in requests})
    try:
        with_retries(attempt, what=f"read {len(requests)} byte range(s) of {len(files)} file(s)")
    except TransientIOError as exc:
        failed = [requests[i][0] for i in pending]
        raise TransientIOError(f"{failed[0].file}: {_describe(failed)}: {exc}") from exc
    return out


def _past_the_end(fs: fsspec.AbstractFileSystem, path: str, start: int, error: BaseException) -> bytes | BaseException:
    """b"" when `start` is at or past the end of the file (object stores refuse such a range, e.g. HTTP
    416, where a local read returns nothing: a tar cut short, an empty file); else the error itself."""
    try:
        size = fs.size(path)
    except Exception:
        return error
    return b"" if size is not None and start >= size else error


def _describe(requests: list[_Request]) -> str:
    wants = [w for r in requests for w in r.wants]
    names = ", ".join(f"key {w.key!r} ({w.member or 'whole file'})" for w in wants[:3])
    return names + (f" and {len(wants) - 3} more" if len(wants) > 3 else "")


def _cut(request: _Request, blob: bytes | BaseException, want: _Want, max_bytes: int) -> bytes | ImageFailure:
    """One want's bytes out of its request's result."""
    if isinstance(blob, BaseException):
        return ImageFailure(UNREADABLE, f"{want.where()}: {type(blob).__name__}: {blob}"[:300])
    if want.size is None:
        return _too_large(want.file, len(blob), max_bytes) if len(blob) > max_bytes else bytes(blob)
    rel = want.start - request.start
    data = blob[rel:rel + want.size]
    if len(data) < want.size:
        return ImageFailure(UNREADABLE, f"{want.where()}: only {len(data)} of its {want.size} bytes are there "
                                        "(the file ends early: truncated?)")
    return bytes(data)
