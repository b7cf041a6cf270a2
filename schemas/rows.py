"""Pydantic row models: the per-row view of the Arrow schemas in `schemas.tables`, and reject reasons.

Used where rows are validated one at a time (tests, `grit validate`, the trainer, user code); the
pipeline's hot paths work on Arrow batches directly. A caller that has already checked every box and score
of its rows with one `schemas.boxes.check_boxes` call over a whole table (`grit validate`) passes the
validation context `{BOXES_CHECKED: True}`: the per-entry box check (a numpy call per box) is then skipped.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from schemas.boxes import check_boxes

# validation context key: the caller checked every box and score with `check_boxes` (corners stay unclipped)
BOXES_CHECKED = "boxes_checked"


class RejectReason(str, Enum):
    """Every reason a row can be dropped, by stage. Stats and reports group by these strings."""

    # ingest
    DOWNLOAD_FAILED = "download_failed"
    EMPTY_CAPTION = "empty_caption"
    CAPTION_TOO_LONG = "caption_too_long"
    MISSING_IMAGE = "missing_image"
    DUPLICATE_KEY = "duplicate_key"
    BAD_SOURCE_ROW = "bad_source_row"
    # ingest, and every later reader of image references (stages.image_refs)
    IMAGE_NOT_ALLOWED = "image_not_allowed"  # outside the source folder and ingest.external_images
    IMAGE_WEB_URL = "image_web_url"  # http(s): never fetched by the pipeline (`grit download` does that)
    # chunks
    UNSAFE_CAPTION = "unsafe_caption"
    NO_CHUNKS = "no_chunks"
    # detect (image decoding and the detector)
    IMAGE_UNREADABLE = "image_unreadable"
    IMAGE_DECODE_ERROR = "image_decode_error"
    IMAGE_TOO_LARGE = "image_too_large"
    IMAGE_TOO_SMALL = "image_too_small"
    BAD_DETECTION = "bad_detection"
    NO_DETECTION = "no_detection"
    # select
    NO_BOX = "no_box"
    # compose
    BAD_CHUNK = "bad_chunk"  # a pair's chunk has offsets outside the caption or an expression not containing it


class Reject(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: str
    stage: str
    reason: str
    detail: str = ""


class SpanBox(BaseModel):
    """One `[start, end, x1, y1, x2, y2, score]` entry of `noun_chunks` / `ref_exps`. The box and score are
    checked by `schemas.boxes.check_boxes` (corners within its float-noise tolerance are clipped into [0, 1]),
    unless the validation context says the caller has checked them (`BOXES_CHECKED`)."""

    model_config = ConfigDict(frozen=True)

    start: int = Field(ge=0)
    end: int
    x1: float
    y1: float
    x2: float
    y2: float
    score: float

    @classmethod
    def from_list(cls, values: list[float], context: dict | None = None) -> SpanBox:
        if len(values) != 7:
            raise ValueError(f"expected [start, end, x1, y1, x2, y2, score], got {len(values)} values")
        start, end, x1, y1, x2, y2, score = values
        if start != int(start) or end != int(end):
            raise ValueError(f"span offsets must be whole numbers, got {start}, {end}")
        return cls.model_validate(dict(start=int(start), end=int(end), x1=x1, y1=y1, x2=x2, y2=y2, score=score),
                                  context=context)

    @model_validator(mode="before")
    @classmethod
    def _box(cls, data, info: ValidationInfo):
        if not isinstance(data, dict) or (info.context or {}).get(BOXES_CHECKED):
            return data
        try:
            corners = [float(data[k]) for k in _CORNERS]
            score = float(data["score"])
        except (KeyError, TypeError, ValueError):
            return data  # field validation names what is missing or not a number
        check = check_boxes([corners], [score])
        if not check.ok[0]:
            raise ValueError(f"{check.describe(0)} (box {tuple(corners)}, score {score})")
        return {**data, **dict(zip(_CORNERS, (float(v) for v in check.clipped[0]), strict=True))}

    @model_validator(mode="after")
    def _ordered(self) -> SpanBox:
        if self.end <= self.start:
            raise ValueError(f"empty or inverted span [{self.start}, {self.end})")
        return self


_CORNERS = ("x1", "y1", "x2", "y2")


class GritRow(BaseModel):
    """A final GrIT row, as released in GRIT-20M plus the two grounded-caption views."""

    model_config = ConfigDict(extra="allow")

    key: str
    url: str | None = None
    caption: str
    width: int | None = None
    height: int | None = None
    noun_chunks: list[SpanBox]
    ref_exps: list[SpanBox]
    grounded_caption: str
    markdown_caption: str

    @field_validator("noun_chunks", "ref_exps", mode="before")
    @classmethod
    def _from_lists(cls, v, info: ValidationInfo):
        return [SpanBox.from_list(x, info.context) if isinstance(x, (list, tuple)) else x for x in v]

    @model_validator(mode="after")
    def _spans_inside_caption(self) -> GritRow:
        if len(self.noun_chunks) != len(self.ref_exps):
            raise ValueError("noun_chunks and ref_exps must align 1:1")
        n = len(self.caption)
        for name, entries in (("noun_chunks", self.noun_chunks), ("ref_exps", self.ref_exps)):
            for e in entries:
                if e.end > n:
                    raise ValueError(f"{name} span [{e.start}, {e.end}) outside caption of {n} chars")
        for chunk, expr in zip(self.noun_chunks, self.ref_exps, strict=True):  # lengths checked above
            if not (expr.start <= chunk.start and chunk.end <= expr.end):
                raise ValueError(f"ref_exp [{expr.start}, {expr.end}) does not contain its chunk "
                                 f"[{chunk.start}, {chunk.end})")
        return self
