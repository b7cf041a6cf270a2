"""The `detect` stage: ground each caption's noun chunks to boxes with an open-vocabulary detector.

Two steps, so the GPU never waits on JPEG decoding:

- `prepare_batch` (CPU, run by the engine in Ray tasks ahead of the GPU actors): read each row's image
  (`stages.image_reader`: one ranged read per image, or per run of neighbouring tar members, from
  `image_ref`/`image_offset`/`image_size`; only references `allowed_images` allows, never http(s):
  others are rejected `image_not_allowed`/`image_web_url` unread), decode and resize it to the detector's input size
  (`stages.images`), and pass the pixels on as Arrow columns `pixels` (uint8 HWC RGB bytes), `pix_h`,
  `pix_w`, with the original size in `img_w`, `img_h`. Unreadable/undecodable/too large/too small images
  become rejects. The replay backend needs no pixels, but unless `check_images` is false it still reads
  each row's image and checks it (`stages.images.check_image`: the same checks and reject reasons, at
  JPEG draft scale), adding only `img_w`, `img_h`. A transient read error that outlasts its retries
  raises, failing the shard (a re-run retries it), never rejecting rows.
- `process_batch` (GPU actor, model loaded once in `setup`): one forward pass per image with all of its
  chunks in one prompt, batched across images of one pixel size, and the raw candidates out: every
  (box, chunk) pair scoring at least `floor`, each chunk's best `chunk_candidates` and at most
  `max_candidates` per image besides, before threshold or NMS, so `select` re-thresholds on CPU without
  re-running this stage.

Scores follow the paper's detector (see stages/detectors/README.md, "Scores"): the prompt is the caption
itself, normalized and lower-cased as GroundingDINO's token-span mode feeds it, each chunk located by its
char span (GLIP's phrase grounding); a chunk's score is the mean of its tokens' probabilities (GLIP's
`score_agg` MEAN, GroundingDINO's normalized positive map); resizing follows GroundingDINO's
`get_size_with_aspect_ratio`; the forward pass runs in fp32 unless `precision` says otherwise, and
`precision` is part of the fingerprint.

Backends (`stages.detectors`): `groundingdino` (official code), `hf` (transformers GroundingDINO or
OWLv2) and `replay` (precomputed boxes or GRIT-20M's own `noun_chunks`; needs no image at all).
A row that ends with no candidate is rejected `no_detection` (or `bad_detection` when every replayed box
was unusable).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pyarrow as pa

from schemas.rows import RejectReason
from schemas.tables import CANDIDATE_TYPE, DETECT_SCHEMA, REJECT_SCHEMA
from stages.base import Execution, Resources, Stage, StageConfig, StageResult
from stages.detectors import ChunkPrompt, Detections, ImageInput, build_detector, resize_spec
from stages.detectors.config import REPLAY_QUEUED_PARTS, DetectConfig, DetectExecution, default_part_rows
from stages.image_reader import locations_of, read_images
from stages.image_refs import ImageAllowList
from stages.images import DecodeLimits, ImageFailure, check_image, decode_image

# columns prepare_batch adds for process_batch (never written: the stage's output is DETECT_SCHEMA)
PIXELS, PIX_H, PIX_W, IMG_W, IMG_H = "pixels", "pix_h", "pix_w", "img_w", "img_h"
SOURCE_BOXES = "src_noun_chunks"


class DetectStage(Stage[DetectConfig]):
    name: ClassVar[str] = "detect"
    # 2: ranged image reads; replay checks images (check_images). 3: mean chunk scores over caption prompts,
    # precision fingerprinted, batches of one pixel size, a per-chunk reserve under the cap, the official resize
    version: ClassVar[int] = 3
    Config: ClassVar[type[StageConfig]] = DetectConfig
    Execution: ClassVar[type[Execution]] = DetectExecution
    output_schema: ClassVar[pa.Schema] = DETECT_SCHEMA
    # Which image references prepare_batch reads (`stages.image_refs`). The engine sets the run's list (its
    # input folder and ingest.external_images, as ingest checked them); a DetectStage used on its own reads
    # any local path or object-store URI. Never http(s).
    allowed_images: ImageAllowList = ImageAllowList(anywhere=True)

    def __init__(self, config: DetectConfig | None = None, execution: DetectExecution | None = None):
        super().__init__(config, execution)
        self._detector = None

    def __getstate__(self):  # ship the config to Ray workers, never a loaded model
        state = self.__dict__.copy()
        state["_detector"] = None
        return state

    @property
    def resources(self) -> Resources:
        ex = self.execution
        # the backends that need no pixels (`resize_spec(config) is None`), without calling resize_spec:
        # for an hf model it loads the model's config (transformers, maybe the hub) just to plan
        replay = self.config.backend == "replay"
        uses_gpu = not replay and ex.device != "cpu"
        part_rows = ex.part_rows or default_part_rows(ex.batch_size)
        queued = ex.queued_parts if ex.queued_parts is not None else (REPLAY_QUEUED_PARTS if replay else 1)
        # process_batch per forward batch (the actor loops over a part), or per part for the replay backend
        return Resources(cpus=ex.cpus, gpus=ex.gpus if uses_gpu else 0.0, actor=True,
                         batch_size=part_rows if replay else ex.batch_size, part_rows=part_rows,
                         queued_parts=queued, pool_size=ex.pool_size)

    def setup(self) -> None:
        if self._detector is None:
            self._detector = build_detector(self.config, self.execution)

    @property
    def detector(self):
        self.setup()
        return self._detector

    # --- CPU: read + decode + resize ------------------------------------------------------------
    def prepare_batch(self, table: pa.Table) -> StageResult:
        spec = resize_spec(self.config)
        if spec is None:  # replay: no pixels needed, only the image check
            return self._check_images(table) if self._checks_images(table) else StageResult(
                table, REJECT_SCHEMA.empty_table())
        rejects = self.rejects()
        limits = self._limits()
        keys = table.column("key").to_pylist()
        keep = np.zeros(len(keys), bool)
        pixels, pix_h, pix_w, img_w, img_h = [], [], [], [], []
        blobs = read_images(locations_of(table), self.config.max_image_bytes,
                            allowed=self.allowed_images)
        for i, (key, blob) in enumerate(zip(keys, blobs, strict=True)):
            decoded = blob if isinstance(blob, ImageFailure) else decode_image(blob, spec, limits)
            if isinstance(decoded, ImageFailure):
                rejects.add(key, decoded.reason, decoded.detail)
                continue
            keep[i] = True
            pixels.append(decoded.pixels.tobytes())
            pix_h.append(decoded.pixels.shape[0])
            pix_w.append(decoded.pixels.shape[1])
            img_w.append(decoded.width)
            img_h.append(decoded.height)
        out = _replace_columns(table.filter(pa.array(keep)), {
            PIXELS: pa.array(pixels, pa.large_binary()), PIX_H: pa.array(pix_h, pa.int32()),
            PIX_W: pa.array(pix_w, pa.int32()), IMG_W: pa.array(img_w, pa.int32()),
            IMG_H: pa.array(img_h, pa.int32())})
        return StageResult(out, rejects.table())

    def _limits(self) -> DecodeLimits:
        return DecodeLimits(max_pixels=self.config.max_image_pixels, min_side=self.config.min_image_side)

    def _checks_images(self, table: pa.Table) -> bool:
        """Whether a pixel-free backend checks this batch's images (`DetectConfig.check_images`)."""
        if self.config.check_images is None:
            return "image_ref" in table.column_names and table.column("image_ref").null_count < table.num_rows
        return self.config.check_images

    def _check_images(self, table: pa.Table) -> StageResult:
        """Read and check each row's image without decoding pixels; rows without an image_ref pass
        unchecked unless check_images is true. Adds the oriented image size (null when unchecked)."""
        rejects = self.rejects()
        limits = self._limits()
        keys = table.column("key").to_pylist()
        locations = locations_of(table)
        every_row = self.config.check_images is True
        keep = np.zeros(len(keys), bool)
        img_w: list[int | None] = []
        img_h: list[int | None] = []
        blobs = read_images(locations, self.config.max_image_bytes, allowed=self.allowed_images)
        for i, (key, loc, blob) in enumerate(zip(keys, locations, blobs, strict=True)):
            if loc is None and not every_row:
                checked: tuple[int | None, int | None] | ImageFailure = (None, None)
            else:
                checked = blob if isinstance(blob, ImageFailure) else check_image(blob, limits)
            if isinstance(checked, ImageFailure):
                rejects.add(key, checked.reason, checked.detail)
                continue
            keep[i] = True
            img_w.append(checked[0])
            img_h.append(checked[1])
        out = _replace_columns(table.filter(pa.array(keep)), {
            IMG_W: pa.array(img_w, pa.int32()), IMG_H: pa.array(img_h, pa.int32())})
        return StageResult(out, rejects.table())

    # --- GPU: detect ----------------------------------------------------------------------------
    def process_batch(self, table: pa.Table) -> StageResult:
        detector = self.detector
        early = REJECT_SCHEMA.empty_table()
        unprepared = (PIXELS not in table.column_names if detector.needs_pixels
                      else IMG_W not in table.column_names and self._checks_images(table))
        if unprepared:  # called without prepare_batch
            prepared = self.prepare_batch(table)
            table, early = prepared.output, prepared.rejects
        rejects = self.rejects()

        keys = table.column("key").to_pylist()
        captions = table.column("caption").to_pylist()
        chunks = table.column("chunks").to_pylist()
        pixels = self._pixels(table) if detector.needs_pixels else [None] * len(keys)
        sources = (table.column(SOURCE_BOXES).to_pylist() if SOURCE_BOXES in table.column_names
                   else [None] * len(keys))

        rows, images, prompts = [], [], []
        for i, key in enumerate(keys):
            if not chunks[i]:
                rejects.add(key, RejectReason.NO_DETECTION, "row has no chunks to ground")
                continue
            rows.append(i)
            images.append(ImageInput(key, pixels[i], sources[i]))
            prompts.append(ChunkPrompt.from_caption(captions[i], [(c["start"], c["end"]) for c in chunks[i]]))
        found = detector.detect(images, prompts) if rows else []

        out_keys, out_dets = [], []
        for i, det in zip(rows, found, strict=True):
            if len(det) == 0:
                rejects.add(keys[i], det.reason or RejectReason.NO_DETECTION, det.detail)
            else:
                out_keys.append(keys[i])
                out_dets.append(det)
        output = candidates_table(out_keys, out_dets)
        return StageResult(output, pa.concat_tables([early, rejects.table()]))

    @staticmethod
    def _pixels(table: pa.Table) -> list[np.ndarray]:
        blobs = table.column(PIXELS).to_pylist()
        hs = table.column(PIX_H).to_pylist()
        ws = table.column(PIX_W).to_pylist()
        return [np.frombuffer(b, np.uint8).reshape(h, w, 3) for b, h, w in zip(blobs, hs, ws, strict=True)]


def _replace_columns(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    """`table` with `columns` appended, replacing any of the same names."""
    table = table.drop_columns([name for name in columns if name in table.column_names])
    for name, values in columns.items():
        table = table.append_column(name, values)
    return table


def candidates_table(keys: list[str], detections: list[Detections]) -> pa.Table:
    """Rows of DETECT_SCHEMA from one `Detections` per key."""
    lengths = np.array([len(d) for d in detections], np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)

    def cat(name: str, dtype, shape=(0,)) -> np.ndarray:
        parts = [getattr(d, name) for d in detections]
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(shape, dtype)

    xyxy = cat("xyxy", np.float64, (0, 4)).reshape(-1, 4)
    fields = {
        "box": pa.array(cat("box", np.int32), pa.int32()),
        "chunk": pa.array(cat("chunk", np.int32), pa.int32()),
        "x1": pa.array(xyxy[:, 0], pa.float64()),
        "y1": pa.array(xyxy[:, 1], pa.float64()),
        "x2": pa.array(xyxy[:, 2], pa.float64()),
        "y2": pa.array(xyxy[:, 3], pa.float64()),
        "score": pa.array(cat("score", np.float32), pa.float32()),
        "box_score": pa.array(cat("box_score", np.float32), pa.float32()),
    }
    structs = pa.StructArray.from_arrays(list(fields.values()), fields=list(CANDIDATE_TYPE))
    candidates = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), structs,
                                          type=pa.list_(CANDIDATE_TYPE))
    return pa.Table.from_arrays([pa.array(keys, pa.string()), candidates], schema=DETECT_SCHEMA)
