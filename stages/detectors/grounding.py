"""The batched detection loop the model backends share.

`detect(images, prompts)` splits each image's prompt into passes (one unless the chunks overflow the text
encoder's budget), orders the (image, pass) jobs by image size so a batch pads little, runs them through
the model `batch_size` at a time (halving on CUDA out-of-memory), and folds each image's entries into a
`Detections` with the floor and the per-image cap. Subclasses supply the passes (`_passes`) and the
forward pass + decoding of one batch of jobs (`_run_jobs`).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from schemas.rows import RejectReason
from stages.detectors.base import ChunkPrompt, Detections, ImageInput, finalize
from stages.detectors.batching import autocast_dtype, inference_context, resolve_device, run_batched
from stages.detectors.postprocess import concat_entries, cxcywh_to_xyxy, entries_from_probs, sigmoid
from stages.detectors.prompts import PromptPass, split_prompt, token_chunk_map

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Job:
    """One forward pass: image `image` (index into the batch) with prompt pass number `index`."""

    image: int
    index: int
    prompt: PromptPass
    pixels: np.ndarray
    n_chunks: int


class BatchedDetector(ABC):
    needs_pixels = True

    def __init__(self, *, floor: float = 0.1, max_candidates: int = 100, batch_size: int = 8,
                 device: str = "auto", precision: str = "auto"):
        self.floor = floor
        self.max_candidates = max_candidates
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.amp_dtype = autocast_dtype(self.device, precision)

    @abstractmethod
    def _passes(self, prompt: ChunkPrompt) -> list[PromptPass]:
        """The prompt passes of one image (empty when it has no chunk text)."""

    @abstractmethod
    def _run_jobs(self, jobs: Sequence[Job]) -> list[tuple[np.ndarray, ...]]:
        """Raw entries (box, chunk, xyxy, score, box_score) of each job, from one batched forward pass."""

    def detect(self, images: Sequence[ImageInput], prompts: Sequence[ChunkPrompt]) -> list[Detections]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        jobs: list[Job] = []
        for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
            if image.pixels is None:
                raise ValueError(f"row {image.key!r}: this detector needs decoded pixels")
            for k, p in enumerate(self._passes(prompt)):
                jobs.append(Job(i, k, p, image.pixels, len(prompt.phrases)))
        # similar sizes together: less padding per batch (order fixed, so results are reproducible)
        jobs.sort(key=lambda j: (j.pixels.shape[0], j.pixels.shape[1], j.image, j.index))
        with inference_context(self.device, self.amp_dtype):
            entries, self.batch_size = run_batched(jobs, self.batch_size, self._run_jobs)
        per_image: list[list[tuple[np.ndarray, ...]]] = [[] for _ in images]
        for job, e in zip(jobs, entries, strict=True):
            per_image[job.image].append(e)
        out = []
        for parts in per_image:
            if not parts:
                out.append(Detections.empty(RejectReason.NO_DETECTION, "no chunk text to ground"))
                continue
            out.append(finalize(*concat_entries(parts), floor=self.floor, max_candidates=self.max_candidates))
        return out


class TokenGroundingDetector(BatchedDetector):
    """GroundingDINO-style models: one text prompt per pass, a score per (query, token), boxes as
    normalized cxcywh of each image's unpadded region. Subclasses set `tokenizer`, `max_text_tokens`,
    and implement `_forward`."""

    tokenizer = None
    max_text_tokens: int = 256
    num_queries: int = 900

    def _count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _passes(self, prompt: ChunkPrompt) -> list[PromptPass]:
        return split_prompt(prompt.phrases, self._count_tokens, self.max_text_tokens,
                            self.tokenizer.num_special_tokens_to_add(pair=False))

    def _tokenize(self, texts: list[str]):
        return self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_text_tokens,
                              return_offsets_mapping=True, return_tensors="pt")

    @abstractmethod
    def _forward(self, pixels: list[np.ndarray], texts: list[str], encoding) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Q, >= T) logits over text positions and (B, Q, 4) normalized cxcywh boxes."""

    def _run_jobs(self, jobs: Sequence[Job]) -> list[tuple[np.ndarray, ...]]:
        texts = [j.prompt.text for j in jobs]
        encoding = self._tokenize(texts)
        logits, boxes = self._forward([j.pixels for j in jobs], texts, encoding)
        logits = logits.float().cpu().numpy()
        boxes = boxes.float().cpu().numpy()
        lengths = encoding["attention_mask"].sum(1).tolist()
        offsets = encoding["offset_mapping"].tolist()
        out = []
        for b, job in enumerate(jobs):
            n = int(lengths[b])
            token_chunk = token_chunk_map(offsets[b][:n], job.prompt)
            probs = sigmoid(logits[b, :, :n])
            out.append(entries_from_probs(probs, token_chunk, cxcywh_to_xyxy(boxes[b]), job.n_chunks,
                                          self.floor, first_box=job.index * logits.shape[1]))
        return out
