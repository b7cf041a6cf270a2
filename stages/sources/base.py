"""What every ingest source reader shares: the `SourceShard` unit of work, column-name resolution, stable
keys, fsspec URI helpers, image listings, and `assemble`, which turns a source table into the raw
ingest table that `IngestStage.process_batch` validates.

The raw table (the output of `IngestStage.read`) holds, in this order:
  key, shard, url, caption, width, height, image_ref   -- canonical names, source values (not yet checked)
  image_offset, image_size                             -- where the image's bytes sit inside its tar (null
                                                          when image_ref is not a tar member)
  _ingest_reject, _ingest_detail                       -- what the reader already knows is wrong with a row
                                                          (`bad_source_row`, `download_failed`, an image
                                                          reference refused by `stages.image_refs`:
                                                          `image_not_allowed`, `image_web_url`), or null
  _ingest_image_missing                                -- why the row's image was not found, or null
  passthrough columns                                  -- every other source column, source types kept;
                                                          names clashing with produced columns get `src_`
"""

from __future__ import annotations

import hashlib
import posixpath
import tarfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import fsspec
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.rows import RejectReason
from schemas.tables import INGEST_COLUMNS, PRODUCED_COLUMNS, SOURCE_PREFIX
from stages.image_refs import ImageAllowList, Refusal, check_refs, shown
from stages.sources.config import IngestConfig
from stages.tar_index import TarMember, read_tar_index

SourceFormat = Literal["img2dataset", "folder", "parquet", "grit20m"]

RESERVED_PREFIX = "_ingest_"
REJECT_COL = "_ingest_reject"
DETAIL_COL = "_ingest_detail"
IMAGE_MISSING_COL = "_ingest_image_missing"
RESERVED_COLUMNS = (REJECT_COL, DETAIL_COL, IMAGE_MISSING_COL)
BAD_SOURCE_ROW = RejectReason.BAD_SOURCE_ROW.value
DOWNLOAD_FAILED = RejectReason.DOWNLOAD_FAILED.value

# Source column names tried in order when the config does not name the column.
CAPTION_ALIASES = ("caption", "TEXT", "text")  # img2dataset/GRIT, LAION, COYO
URL_ALIASES = ("url", "URL")
KEY_ALIASES = ("key",)
WIDTH_ALIASES = ("width", "WIDTH")
HEIGHT_ALIASES = ("height", "HEIGHT")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
KEY_HASH_CHARS = 20  # 80 bits of SHA-256: collisions stay below 1e-6 up to a billion rows


class SourceSchemaError(ValueError):
    """A source file that cannot be read as the configured format (missing caption column, wrong type,
    not a tar archive). The message names the file; the engine turns it into a failed shard."""


class SourceShard(BaseModel):
    """One unit of ingest work and of resume: an img2dataset shard, or a slice of an unsharded source.

    `index` is the shard id used in run-directory file names (`shard-00042`); for img2dataset it is the
    number in the source shard's file name, for split sources it counts slices in discovery order.
    `row_start`/`row_end` (end-exclusive) select the slice of `uri` for split sources; both are None when
    the whole file is the shard. `images_uri` is where the shard's images live (a tar, a folder), if any.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int = Field(ge=0)
    uri: str
    format: SourceFormat
    row_start: int | None = Field(default=None, ge=0)
    row_end: int | None = Field(default=None, ge=0)
    images_uri: str | None = None

    @model_validator(mode="after")
    def _slice_bounds(self) -> SourceShard:
        if (self.row_start is None) != (self.row_end is None):
            raise ValueError("row_start and row_end are set together or not at all")
        if self.row_start is not None and self.row_end is not None and self.row_end <= self.row_start:
            raise ValueError(f"empty row slice [{self.row_start}, {self.row_end})")
        return self

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"


def split_shards(uri: str, rows: int, rows_per_shard: int, fmt: str, *, first_index: int = 0,
                 images_uri: str | None = None) -> list[SourceShard]:
    """Consecutive slices of `rows_per_shard` rows (the last may be shorter), numbered from first_index."""
    return [SourceShard(index=first_index + i, uri=uri, format=fmt, row_start=start,
                        row_end=min(start + rows_per_shard, rows), images_uri=images_uri)
            for i, start in enumerate(range(0, rows, rows_per_shard))]


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(uri)


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a URI string, keeping its protocol (`s3://b/x` + `y` -> `s3://b/x/y`)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def parent_uri(uri: str) -> str:
    head, sep, _ = uri.rstrip("/").rpartition("/")
    return (head or "/") if sep else "."


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/"))


def list_dir(uri: str) -> dict[str, str]:
    """Names directly under a folder URI mapped to their type (`file`/`directory`); empty if absent. A
    local symlink has the type of what it points at (readers check where it leads: `stages.image_refs`)."""
    fs, path = url_to_fs(uri)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    return {basename(e["name"]): _entry_type(fs, e) for e in entries}


def _entry_type(fs: fsspec.AbstractFileSystem, entry: dict) -> str:
    kind = entry.get("type", "file")
    if entry.get("islink") and kind == "other":  # fsspec lists local links as "other"
        try:
            kind = fs.info(entry["name"]).get("type", kind)  # follows the link
        except OSError:  # a dangling link
            pass
    return kind


def relative_image_path(value: str) -> str | None:
    """The normalized POSIX path of an image inside a source folder, or None when it points outside (an
    absolute path, a URL, or a path climbing out with `..`)."""
    value = value.strip()
    if not value or "://" in value or value.startswith("/"):
        return None
    norm = posixpath.normpath(value)
    if norm == "." or norm == ".." or norm.startswith("../"):
        return None
    return norm


def resolve_image_paths(values: Sequence[str | None], base: str,
                        allowed: ImageAllowList) -> tuple[list[str | None], list[Refusal | None]]:
    """Where each image path of a source points, checked (`stages.image_refs.check_refs`): a relative
    path inside the source folder `base` is joined onto it; an absolute path or URL is taken as it is; a
    relative path that climbs out of the folder is refused as written. Refused and null values get a
    null ref; nothing is read or listed here."""
    refs: list[str | None] = [None] * len(values)
    refusals: list[Refusal | None] = [None] * len(values)
    for i, value in enumerate(values):
        if value is None or not value.strip():
            continue
        value = value.strip()
        if "://" in value or value.startswith("/"):
            refs[i] = value
            continue
        inside = relative_image_path(value)
        if inside is None:
            refusals[i] = Refusal(RejectReason.IMAGE_NOT_ALLOWED,
                                  f"image path {shown(value)} climbs out of the source folder")
        else:
            refs[i] = join_uri(base, inside)
    for i, refusal in enumerate(check_refs(refs, allowed)):
        if refusal is not None:
            refs[i], refusals[i] = None, refusal
    return refs, refusals


def existing_files(uris: Iterable[str]) -> set[str]:
    """Which of `uris` exist as files, with one listing per distinct parent folder. Only pass URIs that
    `check_refs` allowed: listing a folder is a request to wherever it is."""
    by_dir: dict[str, set[str]] = defaultdict(set)
    for u in uris:
        by_dir[parent_uri(u)].add(u)
    present: set[str] = set()
    for folder in sorted(by_dir):
        files = {name for name, kind in list_dir(folder).items() if kind == "file"}
        present.update(u for u in by_dir[folder] if posixpath.basename(u) in files)
    return present


def flag_refused(refusals: Sequence[Refusal | None], reject: list[str | None], detail: list[str | None],
                 prefix: Callable[[int], str] = lambda i: "") -> None:
    """Record each refused image reference as its row's reader reject, unless the row already has one."""
    for i, refusal in enumerate(refusals):
        if refusal is not None and reject[i] is None:
            reject[i], detail[i] = refusal.reason.value, prefix(i) + refusal.detail


def stable_key(*parts: str) -> str:
    """Key for rows of sources that carry none: the first 20 hex digits of SHA-256 over the parts joined
    by U+001F. Depends only on the row's content, never on position or `rows_per_shard`."""
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:KEY_HASH_CHARS]


def image_index(names: Iterable[str]) -> dict[str, str]:
    """Stem -> name for the image files among `names` (`000042.jpg` -> key `000042`). When one stem has
    several image files, the first name in sorted order wins, so the choice is deterministic."""
    out: dict[str, str] = {}
    for name in sorted(names):
        stem, ext = posixpath.splitext(name)
        if ext.lower() in IMAGE_EXTENSIONS and stem not in out:
            out[stem] = name
    return out


def list_tar_files(tar_uri: str) -> list[TarMember]:
    """The regular files of a tar with the offset and size of their data, read once from its headers
    (`stages.tar_index`). A truncated tar (a shard cut short) yields the members before the cut."""
    try:
        return read_tar_index(tar_uri)
    except tarfile.TarError as exc:
        raise SourceSchemaError(f"{tar_uri}: not a readable tar archive ({exc})") from exc


# --- column resolution -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Columns:
    """Which source column plays each canonical role (None = the source has no such column)."""

    caption: str
    key: str | None
    url: str | None
    width: str | None
    height: str | None
    image: str | None = None

    def consumed(self) -> set[str]:
        return {c for c in (self.caption, self.key, self.url, self.width, self.height, self.image) if c}


def pick_column(names: Sequence[str], configured: str | None, aliases: Sequence[str], role: str,
                source: str, *, required: bool) -> str | None:
    """The source column for `role`: the configured name (must exist) or the first alias present."""
    if configured is not None:
        if configured not in names:
            raise SourceSchemaError(
                f"{source}: no column {configured!r} (ingest.{role}_column); columns are {list(names)}")
        return configured
    for alias in aliases:
        if alias in names:
            return alias
    if required:
        raise SourceSchemaError(
            f"{source}: no {role} column (looked for {', '.join(aliases)}); columns are {list(names)}. "
            f"Set ingest.{role}_column to the right name.")
    return None


def resolve_columns(names: Sequence[str], cfg: IngestConfig, source: str, *,
                    image_aliases: Sequence[str] = (), image_required: bool = False) -> Columns:
    return Columns(
        caption=pick_column(names, cfg.caption_column, CAPTION_ALIASES, "caption", source, required=True),
        key=pick_column(names, cfg.key_column, KEY_ALIASES, "key", source, required=False),
        url=pick_column(names, cfg.url_column, URL_ALIASES, "url", source, required=False),
        width=pick_column(names, None, WIDTH_ALIASES, "width", source, required=False),
        height=pick_column(names, None, HEIGHT_ALIASES, "height", source, required=False),
        image=(pick_column(names, cfg.image_column, image_aliases, "image", source, required=image_required)
               if image_aliases else None),  # only formats that read an image column pass aliases
    )


def as_string_column(column: pa.ChunkedArray | pa.Array, role: str, source: str) -> pa.Array:
    """A caption/url/key/image column as `string`; integers are written in decimal (COYO's int ids)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    t = arr.type
    if pa.types.is_dictionary(t):
        arr, t = arr.dictionary_decode(), t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t) or \
            pa.types.is_integer(t) or pa.types.is_null(t):
        return arr.cast(pa.string())
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        try:
            return arr.cast(pa.string())
        except pa.ArrowInvalid as exc:
            raise SourceSchemaError(f"{source}: {role} column holds bytes that are not UTF-8 ({exc})") from exc
    raise SourceSchemaError(f"{source}: {role} column has type {t}, expected string")


def passthrough_name(name: str) -> str:
    """Source columns whose names the pipeline produces are renamed `src_<name>` (GRIT's `noun_chunks`)."""
    if name in PRODUCED_COLUMNS or name in INGEST_COLUMNS or name.startswith(RESERVED_PREFIX):
        return SOURCE_PREFIX + name
    return name


def assemble(table: pa.Table, cols: Columns, *, source: str, shard: int, key: pa.Array,
             image_ref: pa.Array | None = None, image_offset: pa.Array | None = None,
             image_size: pa.Array | None = None, reject: Sequence[str | None] | None = None,
             detail: Sequence[str | None] | None = None,
             image_missing: Sequence[str | None] | None = None,
             consumed: Iterable[str] = ()) -> pa.Table:
    """Build the raw ingest table (module docstring) from a source table whose roles are `cols`."""
    n = table.num_rows

    def role(name: str | None, what: str, as_string: bool) -> pa.Array:
        if name is None:
            return pa.nulls(n, pa.string())
        return as_string_column(table[name], what, source) if as_string else table[name].combine_chunks()

    def strings(values: Sequence[str | None] | None) -> pa.Array:
        return pa.nulls(n, pa.string()) if values is None else pa.array(values, pa.string())

    arrays = {
        "key": key,
        "shard": pa.array([shard] * n, pa.int32()),
        "url": role(cols.url, "url", True),
        "caption": role(cols.caption, "caption", True),
        "width": role(cols.width, "width", False) if cols.width else pa.nulls(n, pa.int32()),
        "height": role(cols.height, "height", False) if cols.height else pa.nulls(n, pa.int32()),
        "image_ref": image_ref if image_ref is not None else pa.nulls(n, pa.string()),
        "image_offset": image_offset if image_offset is not None else pa.nulls(n, pa.int64()),
        "image_size": image_size if image_size is not None else pa.nulls(n, pa.int64()),
        REJECT_COL: strings(reject),
        DETAIL_COL: strings(detail),
        IMAGE_MISSING_COL: strings(image_missing),
    }
    skip = cols.consumed() | set(consumed)
    for name in table.column_names:
        if name in skip:
            continue
        out_name = passthrough_name(name)
        if out_name in arrays or (out_name != name and out_name in table.column_names):
            raise SourceSchemaError(f"{source}: column {name!r} would be renamed to {out_name!r}, "
                                    "which the source already has")
        arrays[out_name] = table[name]
    return pa.table(arrays)


def fill_missing_keys(keys: Sequence[str | None], source: str, positions: Sequence[int], where: str,
                      reject: list[str | None], detail: list[str | None]) -> pa.Array:
    """Keys as an Arrow column, with a stand-in `<file>#<line or row>` for each missing key; those rows
    are flagged `bad_source_row` (unless already flagged). `where` is "line" or "row"."""
    out: list[str] = []
    for i, key in enumerate(keys):
        if key is None:
            out.append(f"{basename(source)}#{positions[i]}")
            if reject[i] is None:
                reject[i], detail[i] = BAD_SOURCE_ROW, f"{where} {positions[i]}: no key"
        else:
            out.append(key)
    return pa.array(out, pa.string())
