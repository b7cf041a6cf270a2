"""Stage 1, `ingest`: read a source (img2dataset output, an image folder, LAION/COYO Parquet, GRIT-20M
metadata) into the pipeline's first table, `schemas.tables.INGEST_SCHEMA` plus passthrough columns.

Unlike the other stages, ingest reads the source itself, so the engine calls two more methods:
`discover(input_uri)` lists the source shards (the unit of work and resume, DESIGN.md "Run directory"),
and `read(shard)` returns one shard's raw rows. `process_batch` then validates them: it normalizes the
caption and rejects what cannot go on.

Caption normalization, before anything downstream computes a character offset: C0 and C1 control
characters (U+0000-U+001F, U+007F-U+009F: NUL, ESC, BEL, an 8-bit CSI ...) are removed, except the ones
that are whitespace (tab, line feed, VT, FF, CR, NEL), which `caption_whitespace` handles like any other
whitespace. Emoji, combining marks, right-to-left scripts and other Unicode are kept. The stage's
`StageResult.counters["control_chars_removed"]` counts the rows passed on whose caption lost a control
character. Format-specific reading lives in `stages.sources`, one module per
format; this module holds the config and the format-independent checks.

Rejects (each input row gets at most one; the first that applies wins, in this order):
  (reader)          what `read` found: bad_source_row (unparseable row, no key), download_failed
                    (img2dataset `status != "success"`, detail = its error_message), image_not_allowed
                    (an image reference outside the source folder and `external_images`) or
                    image_web_url (an http(s) reference: never fetched), by `stages.image_refs`
  bad_source_row    the key is empty, longer than 256 characters, or holds `/`, `\\`, `..` or a
                    control character (keys become parts of URLs and paths in tools downstream)
  missing_image     the row's image is not where the source says (only when require_image)
  empty_caption     null, empty, or whitespace- and control-character-only caption
  caption_too_long  more than max_caption_chars characters after whitespace normalization
  duplicate_key     a key already kept earlier in the same shard (the first occurrence is kept).
                    A key in two shards is caught later, when final shards are published in shard order
                    (`grit_pipeline.engine.publish`): the higher shard's row is rejected there.
"""

from __future__ import annotations

import logging
import os
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.rows import RejectReason
from schemas.tables import INGEST_COLUMNS, INGEST_FIELDS, INGEST_SCHEMA
from stages.base import Execution, Stage, StageConfig, StageResult
from stages.image_refs import ImageAllowList
from stages.sources import READERS, SourceSchemaError, SourceShard, detect_format
from stages.sources.base import (
    DETAIL_COL,
    IMAGE_MISSING_COL,
    REJECT_COL,
    RESERVED_COLUMNS,
    parent_uri,
    url_to_fs,
)
from stages.sources.config import IngestConfig

__all__ = ["IngestConfig", "IngestStage", "SourceSchemaError", "SourceShard"]

log = logging.getLogger(__name__)

# Unicode White_Space, in RE2 syntax: RE2's \s is ASCII-only and lacks \v; \p{Z} adds NBSP, the
# ideographic space and the line/paragraph separators; U+0085 is NEL.
WHITESPACE = r"[\s\x{0B}\x{85}\p{Z}]+"
BAD_KEY_CHARS = r"/|\\|\.\.|[\x00-\x1f\x7f-\x{9f}]"
# C0 and C1 controls and DEL, minus the whitespace ones (\t \n \v \f \r, NEL U+0085)
CONTROL_CHARS = r"[\x00-\x08\x0e-\x1f\x7f-\x{84}\x{86}-\x{9f}]"
MAX_KEY_CHARS = 256


class IngestStage(Stage[IngestConfig]):
    name: ClassVar[str] = "ingest"
    # 2: image_offset/image_size; control characters removed from captions. 3: image references checked
    # by `stages.image_refs` (allow-list, never http, symlinks resolved)
    version: ClassVar[int] = 3
    Config: ClassVar[type[StageConfig]] = IngestConfig
    Execution: ClassVar[type[Execution]] = Execution  # one task per whole shard (duplicate keys are per shard)
    output_schema: ClassVar[pa.Schema] = INGEST_SCHEMA  # passthrough columns follow

    # --- reading ----------------------------------------------------------------------------------------

    def source_format(self, input_uri: str) -> str:
        return detect_format(input_uri) if self.config.format == "auto" else self.config.format

    def discover(self, input_uri: str) -> list[SourceShard]:
        """The source's shards in index order (deterministic for the same source and config). A local
        path is made absolute first."""
        if "://" not in input_uri and "::" not in input_uri:
            # local paths become absolute: image_ref must not depend on a worker's working directory
            input_uri = os.path.abspath(input_uri)
        if self.config.external_images is True:
            log.warning("ingest.external_images=true: a row of the source can make the workers read any local "
                        "file or object-store object they can reach, with their credentials; list the allowed "
                        "prefixes instead (ingest.external_images=[\"s3://bucket/images/\"])")
        fmt = self.source_format(input_uri)
        if fmt == "grit20m" and self.config.require_image:
            raise SourceSchemaError(f"{input_uri}: GRIT-20M metadata has no images; "
                                    "set ingest.require_image=false")
        return READERS[fmt].discover(input_uri, self.config)

    def image_allow_list(self, input_uri: str) -> ImageAllowList:
        """Where the image references of this source may point (`stages.image_refs`): inside the input
        (a folder, or the folder of an input file) or `external_images`. What every later reader of the
        run's references (detect, report, trainer, export) allows too."""
        if "://" not in input_uri and "::" not in input_uri:
            input_uri = os.path.abspath(input_uri)
        fs, path = url_to_fs(input_uri)
        root = input_uri if fs.isdir(path) else parent_uri(input_uri)
        return self.config.allowed_images(root)

    def read(self, shard: SourceShard) -> pa.Table:
        """One shard's raw rows (canonical column names, source values, `shard` column), unvalidated.
        Raises SourceSchemaError naming the file when it cannot be read as its format."""
        return READERS[shard.format].read(shard, self.config)

    # --- validation -------------------------------------------------------------------------------------

    def process_batch(self, table: pa.Table) -> StageResult:
        cfg = self.config
        n = table.num_rows
        reasons: list[str | None] = [None] * n
        details: list[str | None] = [None] * n

        def reject(mask: np.ndarray, reason: RejectReason, detail) -> None:
            for i in np.flatnonzero(mask):
                if reasons[i] is None:
                    reasons[i], details[i] = reason.value, detail(i)

        keys = table["key"].cast(pa.string()).combine_chunks()
        key_list = keys.to_pylist()
        reader_reason = _optional_strings(table, REJECT_COL, n)
        reader_detail = _optional_strings(table, DETAIL_COL, n)
        for i, r in enumerate(reader_reason):
            if r is not None:
                reasons[i], details[i] = r, reader_detail[i] or ""

        key_len = _filled(pc.utf8_length(keys), 0)
        bad_key = (_filled(pc.match_substring_regex(keys, BAD_KEY_CHARS), True) | (key_len == 0)
                   | (key_len > MAX_KEY_CHARS))
        reject(bad_key, RejectReason.BAD_SOURCE_ROW, lambda i: _bad_key_detail(key_list[i]))

        image_ref = (table["image_ref"].cast(pa.string()).combine_chunks() if "image_ref" in table.column_names
                     else pa.nulls(n, pa.string()))
        if IMAGE_MISSING_COL in table.column_names:  # the reader says which rows expected an image
            why_missing = table[IMAGE_MISSING_COL].to_pylist()
            expected = np.array([w is not None for w in why_missing], dtype=bool)
            check_images = cfg.require_image is not False
        else:  # a table not made by `read`: only an explicit require_image checks image_ref
            why_missing, expected = [None] * n, True
            check_images = cfg.require_image is True
        if check_images:
            missing = _filled(pc.is_null(image_ref), False) & expected
            reject(missing, RejectReason.MISSING_IMAGE, lambda i: why_missing[i] or "no image_ref")

        raw_caption = table["caption"].cast(pa.string()).combine_chunks()
        without_controls = remove_control_chars(raw_caption)
        controls_removed = _filled(pc.not_equal(raw_caption, without_controls), False)
        caption = normalize_captions(without_controls, cfg.caption_whitespace)
        visible = normalize_captions(without_controls, "strip")
        empty = _filled(pc.equal(pc.utf8_length(visible), 0), True)
        reject(empty, RejectReason.EMPTY_CAPTION,
               lambda i: "caption is null" if not raw_caption[i].is_valid
               else "caption is empty or whitespace" if not controls_removed[i]
               else "caption holds only whitespace and control characters")
        if cfg.max_caption_chars is not None:
            length = _filled(pc.utf8_length(caption), 0)
            reject(length > cfg.max_caption_chars, RejectReason.CAPTION_TOO_LONG,
                   lambda i: f"{length[i]} characters > max_caption_chars {cfg.max_caption_chars}")

        first_row: dict[str, int] = {}
        for i in range(n):
            if reasons[i] is None:
                if key_list[i] in first_row:
                    reasons[i] = RejectReason.DUPLICATE_KEY.value
                    details[i] = f"key also at row {first_row[key_list[i]]} of this shard, which is kept"
                else:
                    first_row[key_list[i]] = i

        rejects = self.rejects()
        for i, reason in enumerate(reasons):
            if reason is not None:
                rejects.add(key_list[i] if key_list[i] is not None else f"<row {i}>", reason, details[i] or "")
        kept = np.array([r is None for r in reasons], dtype=bool)
        return StageResult(self._output(table, caption, kept), rejects.table(),
                           counters={"control_chars_removed": int((controls_removed & kept).sum())})

    def _output(self, table: pa.Table, caption: pa.Array, kept: np.ndarray) -> pa.Table:
        idx = pa.array(np.flatnonzero(kept), pa.int64())
        n = table.num_rows

        def column(name: str, convert, null_type: pa.DataType):
            return convert(table[name]) if name in table.column_names else pa.nulls(n, null_type)

        canonical = {
            "key": table["key"].cast(pa.string()),
            "shard": table["shard"].cast(pa.int32()),
            "url": column("url", lambda c: c.cast(pa.string()), pa.string()),
            "caption": caption,
            "width": column("width", dimension_column, pa.int32()),
            "height": column("height", dimension_column, pa.int32()),
            "image_ref": column("image_ref", lambda c: c.cast(pa.string()), pa.string()),
            "image_offset": column("image_offset", lambda c: c.cast(pa.int64()), pa.int64()),
            "image_size": column("image_size", lambda c: c.cast(pa.int64()), pa.int64()),
        }
        fields = list(INGEST_FIELDS)
        arrays = [pc.take(canonical[f.name], idx) for f in INGEST_FIELDS]
        for field in table.schema:
            if field.name not in INGEST_COLUMNS and field.name not in RESERVED_COLUMNS:
                fields.append(field)
                arrays.append(pc.take(table[field.name], idx))
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def allowed_images_of_run(run_yaml: dict) -> ImageAllowList:
    """The allow-list of a pipeline run, from its `run.yaml`: the `allowed_images` the engine recorded
    (`IngestStage.image_allow_list` of its input), or, for a run made before that was recorded, its
    `run.input` and `ingest.external_images`. Nothing allowed when neither can be read."""
    recorded = run_yaml.get("allowed_images")
    try:
        if recorded is not None:
            return ImageAllowList.of(recorded)
        input_uri = (run_yaml.get("run") or {}).get("input")
        external = (run_yaml.get("ingest") or {}).get("external_images", False)
        stage = IngestStage(IngestConfig(external_images=external))
        return stage.image_allow_list(input_uri) if input_uri else ImageAllowList()
    except (ValueError, TypeError, OSError) as e:
        log.warning("cannot tell which image locations the run allowed (%s); reading none", e)
        return ImageAllowList()


def remove_control_chars(captions: pa.Array) -> pa.Array:
    """Captions without C0/C1 control characters other than whitespace (`CONTROL_CHARS`); nulls stay null."""
    return pc.replace_substring_regex(captions, CONTROL_CHARS, "")


def normalize_captions(captions: pa.Array, mode: str) -> pa.Array:
    """Apply `caption_whitespace` (see IngestConfig) to a string array; nulls stay null."""
    if mode == "keep":
        return captions
    if mode == "strip":
        return pc.replace_substring_regex(captions, f"^{WHITESPACE}|{WHITESPACE}$", "")
    if mode == "collapse":
        return pc.utf8_trim(pc.replace_substring_regex(captions, WHITESPACE, " "), characters=" ")
    raise ValueError(f"unknown caption_whitespace mode {mode!r}")


def dimension_column(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Width/height as int32: integers and whole-ish floats as they are (rounded), numeric strings parsed;
    missing, non-numeric, non-positive or out-of-range values become null (never a reject)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    t = arr.type
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        values = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        values = np.array([_parse_number(v) for v in arr.to_pylist()], dtype=np.float64)
    else:
        return pa.nulls(len(arr), pa.int32())
    ok = np.isfinite(values) & (values >= 1) & (values <= np.iinfo(np.int32).max)
    return pa.array(np.rint(np.where(ok, values, 0)).astype(np.int32), mask=~ok)


def _parse_number(value: str | None) -> float:
    try:
        return float(value) if value is not None else np.nan
    except ValueError:
        return np.nan


def _bad_key_detail(key: str | None) -> str:
    if key is None:
        return "key is null"
    if key == "":
        return "key is empty"
    if len(key) > MAX_KEY_CHARS:
        return f"key has {len(key)} characters > {MAX_KEY_CHARS}"
    return f"key {key!r} holds '/', '\\', '..' or a control character"


def _optional_strings(table: pa.Table, name: str, n: int) -> list[str | None]:
    return table[name].to_pylist() if name in table.column_names else [None] * n


def _filled(arr: pa.Array | pa.ChunkedArray, fill) -> np.ndarray:
    return pc.fill_null(arr, fill).to_numpy(zero_copy_only=False)
