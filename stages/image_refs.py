"""Which stored image references may be read: the one check between a row's image reference and a read.

Every place that turns a stored reference into a read calls `check_refs` first and reads only what it
allows: ingest's existence listing (`stages.sources`: a refused reference is neither listed nor kept),
detect's reader (`stages.image_reader.read_images`), which the report's thumbnails, the trainer's loader
and `grit export` read through as well. A refused reference becomes a reject with its reason, never a
read, and never a request.

What is allowed is an `ImageAllowList`: the folder the source lives in, plus the prefixes an operator
lists (`ingest.external_images: ["s3://my-images/", "/mnt/images/"]`), or, with `external_images: true`,
any local path or object-store URI. Checked in this order (the first refusal wins):

1. `http://` and `https://` references are never read, whatever the list says: downloading is
   `grit download`'s job (`image_web_url`). A `tar://member::<url>` is judged by its `<url>`.
2. A reference must be an absolute local path (`/x`, `file:///x`, `local:///x`) or a URL with a
   protocol; a relative path, `~`, a `file://` URL with a host (fsspec would read it relative to the
   working directory), a chain other than `tar://member::<file>`, a wrapping protocol (`zip://`,
   `simplecache://` ...), a control character, a `..` component, or a percent-encoded `.`, `/`, `\\`,
   `%` or NUL (`..%2f`: fsspec reads it literally, a web gateway would not) are refused
   (`image_not_allowed`). Readers resolve relative paths against their own folder before checking.
3. The reference must lie inside an allowed prefix, compared by path components after normalization
   (`s3a://` is `s3://`, `gcs://` is `gs://`, `file:///x` is `/x`, empty and `.` components dropped), so
   `/mnt/images-evil/x` is not inside `/mnt/images/`.
4. A local reference must also stay inside once symlinks are resolved: its real path must lie inside the
   real path of an allowed local prefix (a link in the input folder to `/etc/...` is refused; a link to
   another allowed place is fine). With `true`, any local path is allowed and links are not followed.

Cost (`bench/image_refs.py`): the prefixes are normalized once; a folder is parsed, compared with them
and (local) resolved once per call, however many references it holds; per reference there remain string
checks of the file name and, for a local file under a listed prefix, one `lstat`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, NamedTuple

from pydantic import AfterValidator, BeforeValidator

from schemas.display import display_text
from schemas.rows import RejectReason

LOCAL = "file"
WEB_PROTOCOLS = frozenset({"http", "https"})
# protocols that name an object store; `external_images: true` allows these and local paths (`memory://`
# is in-process and harmless; tests use it)
OBJECT_STORES = {"s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs", "abfs": "abfs", "abfss": "abfs",
                 "az": "abfs", "memory": "memory"}
# fsspec protocols that wrap another URL or read relative to the working directory without one
WRAPPERS = frozenset({"tar", "zip", "libarchive", "simplecache", "filecache", "blockcache", "cached",
                      "reference", "dir", "jlab", "data"})
TAR_PREFIX = "tar://"  # a webdataset member: tar://<member>::<tar url> (stages.image_reader)
_ENCODED = re.compile(r"%(?:2e|2f|5c|25|00)", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_PROTOCOL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_ENCODED_WHY = "holds a percent-encoded '.', '/', '\\', '%' or NUL"
SHOWN_CHARS = 200  # a reference is shown in a reject's detail up to this many characters


class Location(NamedTuple):
    """A normalized place: the protocol (`file` for local paths) and the path's components."""

    protocol: str
    parts: tuple[str, ...]

    def url(self) -> str:
        path = "/".join(self.parts)
        return f"/{path}" if self.protocol == LOCAL else f"{self.protocol}://{path}"

    def within(self, prefix: Location) -> bool:
        n = len(prefix.parts)
        return self.protocol == prefix.protocol and len(self.parts) > n and self.parts[:n] == prefix.parts


class Refusal(NamedTuple):
    """Why a reference is not read: the reject reason and a detail naming the reference (escaped)."""

    reason: RejectReason
    detail: str


def shown(ref: str) -> str:
    """A reference as a reject detail shows it: escaped (`schemas.display`), quoted, cut short."""
    text = display_text(ref[:SHOWN_CHARS]) + ("..." if len(ref) > SHOWN_CHARS else "")
    return f"'{text}'"


def parse(ref: str) -> Location | str:
    """The normalized location of a reference, or why it is not one (a phrase for the detail)."""
    target = ref
    if ref.startswith(TAR_PREFIX) and "::" in ref:  # tar://member::<file>: the file counts, as the reader sees it
        target = ref.split("::", 1)[1]
    m = _PROTOCOL.match(target)
    if m and m.group(1).lower() in WEB_PROTOCOLS:  # judged first: never read, whatever else it holds
        return Location(m.group(1).lower(), ())
    if _CONTROL.search(target):  # not in a tar member's name: it is looked up in the tar's index, never a path
        return "holds a control character"
    if "::" in target:
        return "is a chained URL (only tar://<member>::<file> is read)"
    if m:
        protocol = m.group(1).lower()
        path = target[m.end():]
        if protocol in WRAPPERS:
            return f"uses the wrapping protocol {protocol}://"
        if protocol in ("file", "local"):
            if not path.startswith("/"):
                return "is a file:// URL with a host or a relative path"
            protocol = LOCAL
        protocol = OBJECT_STORES.get(protocol, protocol)
    elif target.startswith("/"):
        protocol, path = LOCAL, target
    else:
        return "is a relative path (not inside the folder it was resolved against)"
    if _ENCODED.search(path):
        return _ENCODED_WHY
    raw = path.split("/")
    if ".." in raw:
        return "climbs with '..'"
    return Location(protocol, tuple(p for p in raw if p and p != "."))


def parse_prefix(value: str) -> Location:
    """An allow-list entry as a location; ValueError saying what is wrong with it."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{value!r}: an allowed image prefix must be a non-empty string")
    loc = parse(value.strip())
    if isinstance(loc, str):
        raise ValueError(f"allowed image prefix {value!r} {loc}; use an absolute path or a URL such as "
                         "s3://bucket/images/")
    if loc.protocol in WEB_PROTOCOLS:
        raise ValueError(f"allowed image prefix {value!r}: http(s) is never read, with or without an "
                         "allow-list; download the images first (`grit download`)")
    if loc.protocol != LOCAL and not loc.parts:
        raise ValueError(f"allowed image prefix {value!r} names no bucket or host")
    return loc


def _one_prefix(value: object) -> object:
    return [value] if isinstance(value, str) and value.strip().lower() not in ("true", "false") else value


def _normalized(value: bool | list[str]) -> bool | list[str]:
    """Prefixes normalized (`s3a://b/x/` -> `s3://b/x`), deduplicated and sorted, so a fingerprint depends
    on what is allowed, not on how it is spelled; an empty list is false."""
    if isinstance(value, bool):
        return value
    return sorted({parse_prefix(p).url() for p in value}) or False


# The type of an `external_images` setting (`ingest.external_images`, the trainer's): false, true (any local
# path or object-store URI), or a list of prefixes (one string is a list of one); bad prefixes are errors.
ExternalImages = Annotated[bool | list[str], BeforeValidator(_one_prefix), AfterValidator(_normalized)]


@dataclass(frozen=True)
class ImageAllowList:
    """Where image references may point: inside one of `prefixes`, and (`anywhere`) any local path or
    object-store URI. Web URLs never. `opt_in` names the setting that widens it, for reject details."""

    prefixes: tuple[Location, ...] = ()
    anywhere: bool = False
    opt_in: str = "ingest.external_images"
    _local_prefixes: tuple[Location, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_local_prefixes", tuple(p for p in self.prefixes if p.protocol == LOCAL))

    @classmethod
    def of(cls, external: bool | Sequence[str] = False, opt_in: str = "ingest.external_images") -> ImageAllowList:
        """From an `external_images` setting: false, true (anywhere) or prefixes (ValueError on a bad one)."""
        listed = [] if isinstance(external, bool) else list(external)
        return cls(tuple(dict.fromkeys(parse_prefix(p) for p in listed)), anywhere=external is True, opt_in=opt_in)

    def with_roots(self, *roots: str) -> ImageAllowList:
        """This list plus the folders `roots` (local paths are made absolute)."""
        added = [parse_prefix(r if "://" in r else os.path.abspath(r)) for r in roots]
        return ImageAllowList(tuple(dict.fromkeys([*self.prefixes, *added])), self.anywhere, self.opt_in)

    def union(self, other: ImageAllowList) -> ImageAllowList:
        return ImageAllowList(tuple(dict.fromkeys([*self.prefixes, *other.prefixes])),
                              self.anywhere or other.anywhere, self.opt_in)

    def to_config(self) -> bool | list[str]:
        """As a setting value: `True` (anywhere) or the prefixes as normalized URLs (run.yaml records it)."""
        return True if self.anywhere else sorted(p.url() for p in self.prefixes)

    def describe(self) -> str:
        if self.anywhere:
            return "any local path or object-store URI"
        if not self.prefixes:
            return "nowhere"
        names = [p.url() for p in self.prefixes[:3]]
        return ", ".join(names) + (f" and {len(self.prefixes) - 3} more" if len(self.prefixes) > 3 else "")


def check_refs(refs: Sequence[str | None], allowed: ImageAllowList) -> list[Refusal | None]:
    """For each reference, None when it may be read, or why not (module docstring). Null refs pass (None):
    there is nothing to read. Touches no file outside the allowed prefixes: a reference is resolved
    (`lstat`, `realpath`) only once its spelled location is inside one. The work is done once per
    distinct folder of the call; per reference there remain string checks of its file name and, for
    local files, one `lstat`."""
    check = _Checker(allowed)
    return [None if ref is None else check(ref) for ref in refs]


def check_ref(ref: str | None, allowed: ImageAllowList) -> Refusal | None:
    return check_refs([ref], allowed)[0]


class _Folder(NamedTuple):
    """What holds for every file directly in one folder of a `check_refs` call."""

    why: str | None  # why its files are refused (a phrase), or None
    reason: RejectReason = RejectReason.IMAGE_NOT_ALLOWED
    real: str | None = None  # a local folder whose files' links are followed: its real path
    real_inside: bool = True  # ... and whether that lies inside an allowed prefix (once links are resolved)


class _Checker:
    """`check_refs` for one call: folder verdicts and the allowed prefixes' real paths computed once."""

    def __init__(self, allowed: ImageAllowList):
        self.allowed = allowed
        self.folders: dict[str, _Folder] = {}
        self.real_prefixes: list[Location] | None = None

    def __call__(self, ref: str) -> Refusal | None:
        target = ref.split("::", 1)[1] if ref.startswith(TAR_PREFIX) and "::" in ref else ref
        if "::" in target:
            return self._refuse(ref, "is a chained URL (only tar://<member>::<file> is read)")
        folder_text, sep, leaf = target.rpartition("/")
        if not sep:
            return self._refuse(ref, "is a relative path (not inside the folder it was resolved against)")
        folder = self.folders.get(folder_text)
        if folder is None:
            folder = self.folders[folder_text] = self._folder(folder_text)
        if folder.reason is RejectReason.IMAGE_WEB_URL:
            return Refusal(folder.reason, f"image reference {shown(ref)} {folder.why}")
        if not (leaf.isascii() and leaf.isprintable()) and _CONTROL.search(leaf):
            return self._refuse(ref, "holds a control character")
        if leaf in ("", "."):
            return self._refuse(ref, "names a folder, not a file")
        if leaf == ".." or ("%" in leaf and _ENCODED.search(leaf)):
            return self._refuse(ref, "climbs with '..'" if leaf == ".." else _ENCODED_WHY)
        if folder.why is not None:
            return self._refuse(ref, folder.why)
        if folder.real is None:
            return None
        path = f"{folder.real.rstrip('/')}/{leaf}"
        if os.path.islink(path):
            real = _location(os.path.realpath(path))
            if not any(real.within(p) for p in self._real_prefixes()):
                return self._refuse(ref, f"is a symlink to {shown(real.url())}, {self._outside()}")
        elif not folder.real_inside:
            return self._refuse(ref, f"lies in {shown(folder.real)} once symlinks are resolved, {self._outside()}")
        return None

    def _folder(self, text: str) -> _Folder:
        loc = parse(text + "/")
        if isinstance(loc, str):
            return _Folder(loc)
        if loc.protocol in WEB_PROTOCOLS:
            return _Folder("is a web URL: the pipeline never fetches images from the web; download them first "
                           "(`grit download`)", RejectReason.IMAGE_WEB_URL)
        allowed = self.allowed
        if any(_holds(p, loc) for p in allowed.prefixes):
            if loc.protocol != LOCAL or allowed.anywhere:
                return _Folder(None)
            real = os.path.realpath(loc.url())
            return _Folder(None, real=real, real_inside=any(_holds(p, _location(real)) for p in self._real_prefixes()))
        if allowed.anywhere and (loc.protocol == LOCAL or loc.protocol in OBJECT_STORES.values()):
            return _Folder(None)
        return _Folder(self._outside(first=True))

    def _real_prefixes(self) -> list[Location]:
        if self.real_prefixes is None:
            self.real_prefixes = [_location(os.path.realpath(p.url())) for p in self.allowed._local_prefixes]
        return self.real_prefixes

    def _outside(self, first: bool = False) -> str:
        return (f"{'is ' if first else ''}outside the allowed image locations ({self.allowed.describe()}); "
                f"add a prefix to {self.allowed.opt_in} to allow it")

    @staticmethod
    def _refuse(ref: str, why: str) -> Refusal:
        return Refusal(RejectReason.IMAGE_NOT_ALLOWED, f"image reference {shown(ref)} {why}")


def _holds(prefix: Location, folder: Location) -> bool:
    """Whether files directly in `folder` lie inside `prefix` (the folder is the prefix or inside it)."""
    n = len(prefix.parts)
    return folder.protocol == prefix.protocol and folder.parts[:n] == prefix.parts


def _location(local_path: str) -> Location:
    return Location(LOCAL, tuple(p for p in local_path.split("/") if p))
