"""The `detect` stage's settings: `DetectConfig` (what the detector computes; fingerprinted) and
`DetectExecution` (how it runs: batch, pool, GPUs, device; never fingerprinted).

Numeric precision is in `DetectConfig`: bf16 autocast moves scores by about 1e-2 against fp32, enough to
flip pairs near select's 0.65, so it is semantic whatever its name suggests. Batch size stays execution:
a batch holds images of one pixel size only (no padding), which keeps every image's scores within float32
rounding (about 1e-6) of its scores alone (measured: bench/score_rules.py; enforced:
tests/test_fingerprints.py).

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
# Rows per part by default: a 10k-row shard is 20 parts, so detect costs it 42 Ray calls (a split task, 20
# prepare tasks, 20 actor calls, a write task) instead of one prepare task and one actor call per forward batch.
PART_ROWS = 512


# Prepared parts queued per actor for the replay backend: its parts hold no pixels (a few KB per row), so
# more of them keep the actor fed while a small machine's one task slot runs a long task.
REPLAY_QUEUED_PARTS = 8


def default_part_rows(batch_size: int) -> int:
    """PART_ROWS rounded up to whole forward batches, so a part's batches are the shard's batches."""
    return -(-PART_ROWS // batch_size) * batch_size


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

    # how chunks are scored (GroundingDINO-style backends; OWLv2 queries each chunk's text on its own)
    prompt: Literal["caption", "chunks"] = Field(
        "caption", description="caption: the caption itself, whitespace-normalized, lower-cased and ending in "
        "' .', each chunk located by its char span (GLIP's phrase grounding, GroundingDINO's token spans); "
        "chunks: the chunks joined as 'a dog . a field .' (each encoded without the caption's context).")
    chunk_score: Literal["mean", "max"] = Field(
        "mean", description="A box's score for a chunk from the chunk's token probabilities: mean (GLIP's "
        "score_agg MEAN, GroundingDINO's normalized positive map) or max (never below the mean).")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Forward-pass dtype: fp32 (the references), or bf16/fp16 autocast, faster on GPUs "
        "but moving scores by about 1e-2; part of the fingerprint, so a cached output is never reused across it.")

    # what comes out
    floor: float = Field(0.1, ge=0.0, le=1.0,
                         description="Lowest (box, chunk) score kept; select re-thresholds above it.")
    max_candidates: int = Field(100, ge=1, description="Candidates kept per image, best scores first, once "
                                "every chunk has its chunk_candidates.")
    chunk_candidates: int = Field(
        5, ge=0, description="Each chunk's best candidates kept before max_candidates applies, so a chunk "
        "never loses every candidate to its neighbours' near-duplicates (an image may then keep up to "
        "max_candidates + chunk_candidates x chunks); 0: only the per-image cap.")
    max_text_tokens: int | None = Field(
        None, ge=3, description="Prompt token budget; None = the text encoder's (256). A longer caption is "
        "scored in windows (stages/detectors/prompts.py), a longer chunk list in several passes.")

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
        None, ge=1, description="Rows per part, at most (a small shard is cut into 8 parts of whole batches): "
        "one CPU task reads (and decodes) a part's images, one actor call detects it in forward passes of "
        "batch_size. None: 512 rounded up to whole batches (a 10k-row shard then costs 42 Ray calls). Decoded images per actor stay within (1 + queued_parts) x part_rows: "
        "1,024 by default, about 2.6 GB at GroundingDINO's 800 px input (3.3 GB if all were 800 x 1333).")
    queued_parts: int | None = Field(
        None, ge=0, description="Prepared parts per actor besides the one it runs (being prepared, waiting, "
        "or queued at the actor). None: 1 for backends that decode pixels, so decoded images per actor stay "
        "within (1 + queued_parts) x part_rows; 8 for the replay backend (its parts hold no pixels).")
    gpus: float = Field(1.0, ge=0.0, description="GPUs per actor; fractional shares a GPU between actors. "
                        "Ignored (0) for the replay backend and device=cpu.")
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:N.")
