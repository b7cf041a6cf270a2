"""The `ingest` stage's configuration: how the source is read and which rows are rejected.

It lives beside the source readers (`stages.sources.*`), which read it, and below `stages.ingest`, which
owns the stage; every field is semantic (part of the ingest fingerprint).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from stages.base import StageConfig
from stages.image_refs import ExternalImages, ImageAllowList


class IngestConfig(StageConfig):
    """How to read the source and what to reject. Column names default to the first present of a list
    of aliases (caption: caption/TEXT/text; url: url/URL; key: key; width/height: width/WIDTH ...)."""

    format: Literal["auto", "img2dataset", "folder", "parquet", "grit20m"] = Field(
        "auto", description="Source format; `auto` detects it (stages.sources.detect_format).")
    rows_per_shard: int = Field(
        10_000, ge=1, description="Rows per shard when splitting unsharded sources (folder, parquet, "
        "grit20m); img2dataset shards are used as they are.")
    caption_column: str | None = Field(None, description="Source column holding the caption.")
    url_column: str | None = Field(None, description="Source column holding the image URL.")
    key_column: str | None = Field(
        None, description="Source column holding the row key; without one, keys are stable hashes "
        "(folder: of the relative image path; parquet: of url and caption).")
    image_column: str | None = Field(
        None, description="Column with the image path (folder: file/image/file_name/image_path; "
        "parquet: image_path).")
    caption_whitespace: Literal["collapse", "strip", "keep"] = Field(
        "collapse", description="collapse: strip the ends and turn every run of Unicode whitespace "
        "(newlines, tabs, NBSP) into one space -- the grounded-text formats need single-line captions; "
        "strip: only the ends; keep: as in the source.")
    max_caption_chars: int | None = Field(
        2_000, ge=1, description="Longer captions are rejected (caption_too_long); None = no limit. "
        "2,000 characters is ~500 BPE tokens, a quarter of Kosmos-2's 2,048-token training sequence; "
        "alt-texts that long are scraped page text rather than descriptions, and GroundingDINO reads "
        "only 256 text tokens of them.")
    external_images: ExternalImages = Field(
        False,
        description="Image references outside the source's own folder that may be read: a list of URI "
                    "prefixes (`[\"s3://my-images/\", \"/mnt/images/\"]`, compared by path component, "
                    "symlinks resolved), or true for any local path or object-store URI (risky: one crafted "
                    "row can then make the workers read any file or object they can reach, with their "
                    "credentials). http(s) references are never read, whatever this says. Default false: "
                    "only paths inside the source folder. Outside ones are rejected (image_not_allowed, "
                    "image_web_url); `stages.image_refs` holds the rules.")
    require_image: bool | None = Field(
        None, description="Reject rows whose image is missing (missing_image). None = true for every "
        "format except grit20m, which has no images.")

    def allowed_images(self, *roots: str) -> ImageAllowList:
        """What this source's image references may point at: `roots` (the source's own folders) plus
        `external_images`."""
        return ImageAllowList.of(self.external_images).with_roots(*roots)

    def requires_image(self, fmt: str) -> bool:
        return self.require_image if self.require_image is not None else fmt != "grit20m"
