"""The `detect` stage's settings: `DetectConfig` (what the detector computes; fingerprinted) and
`DetectExecution` (how it runs: batch, pool, GPUs, device, precision; never fingerprinted).

They live here, below both `stages.detect` (the stage) and the backends in `stages.detectors`, which
read them; nothing in this module imports a model library.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from stages.base import FileInput, PreparedExecution, StageConfig
from stages.image_reader import DEFAULT_MAX_BYTES
from stages.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE

PathSetting = Annotated[str | None, FileInput()]
REPLAY_PART_ROWS = 512


class DetectConfig(StageConfig):
    """What `detect` computes (config keys `detect.<field>`); every field is part of its fingerprint."""

    backend: Literal["groundingdino", "hf", "replay"] = Field(
        "groundingdino", description="groundingdino: the official IDEA-Research code; hf: transformers' "
        "GroundingDINO or OWLv2; replay: precomputed boxes (a Parquet file, or GRIT-20M's own).")

    # groundingdino: the official package
    gd_checkpoint: PathSetting = Field(
        None, description=".pth or .safetensors, local or fsspec URL; None = random weights (tests only).")
    gd_config: PathSetting = Field(
        None, description="The package's Python config file; None = its GroundingDINO_SwinT_OGC.py.")
    gd_text_encoder: PathSetting = Field(
        None, description="BERT folder or hub id (`text_encoder_type`); None = the config's.")
    gd_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Extra GroundingDINO config fields, e.g. num_queries.")
    # hf: transformers GroundingDinoForObjectDetection or Owlv2ForObjectDetection
    hf_model: PathSetting = Field(None, description="Local model directory or hub id.")
    # replay: see stages/detectors/replay.py for the file schema
    replay_path: PathSetting = Field(None, description="Parquet of precomputed detections (replay_mode=file).")
    replay_mode: Literal["file", "grit20m"] = Field(
        "file", description="file: boxes from replay_path; grit20m: the boxes of the source's own noun_chunks.")

    # what comes out
    floor: float = Field(0.1, ge=0.0, le=1.0,
                         description="Lowest (box, chunk) score kept; select re-thresholds above it.")
    max_candidates: int = Field(100, ge=1, description="Candidates kept per image, best scores first.")
    max_text_tokens: int | None = Field(
        None, ge=3, description="Prompt token budget; None = the text encoder's (256). Longer prompts are split.")

    # image decoding
    input_size: int | None = Field(
        None, ge=16, description="Detector input size; None = backend default (800 shorter side; OWLv2 960 longer).")
    max_size: int | None = Field(1333, description="Longer-side cap for the shorter-side resize.")
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1,
                                  description="Header width*height above this -> image_too_large (bomb limit).")
    max_image_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1,
                                 description="Encoded size above this -> image_too_large, never read.")
    min_image_side: int = Field(DEFAULT_MIN_SIDE, ge=1, description="A side below this -> image_too_small.")
    check_images: bool | None = Field(
        None, description="Backends that need no pixels (replay): still read and check each row's image "
        "(format, the size and bomb limits above, a whole decode at the smallest JPEG draft scale) and "
        "reject failures with the reasons a pixel detector gives. None = check every row that has an "
        "image_ref (rows without one pass: GRIT-20M metadata); true = also reject rows without an image; "
        "false = never open images. Pixel backends always decode, whatever this says.")


class DetectExecution(PreparedExecution):
    """How `detect` runs (`run.resources.detect.<field>`); none of it changes a candidate."""

    batch_size: int = Field(8, ge=1, description="Images per forward pass (halved on CUDA out-of-memory).")
    part_rows: int | None = Field(
        None, ge=1, description="Rows per part: one CPU task reads (and decodes) a part's images, one actor "
        "call detects it in forward passes of batch_size. None: batch_size for backends that decode pixels "
        "(so a part's pixels stay small), REPLAY_PART_ROWS for the replay backend (no pixels: large parts "
        "keep the per-task overhead negligible).")
    gpus: float = Field(1.0, ge=0.0, description="GPUs per actor; fractional shares a GPU between actors. "
                        "Ignored (0) for the replay backend and device=cpu.")
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:N.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Autocast dtype on CUDA (auto = bf16); CPU always runs fp32.")
