"""The batched detection loop the model backends share.

`detect(images, prompts)` splits each image's prompt into passes (one, unless the text overflows the text
encoder's budget: `prompts.py`), groups the (image, pass) jobs into batches that need no pixel padding
(`_batch_key`: GroundingDINO-style backends batch only images of one pixel size, since zero padding
reaches the backbone's border features and moves scores; OWLv2 pads every image to the same square
anyway), runs each group through the model `batch_size` jobs at a time (halving on CUDA out-of-memory),
and folds each image's entries into a `Detections` with the floor and the caps. An image's scores are
then those it gets alone, up to float32 rounding of about 1e-6 (bench/score_rules.py measures it;
tests/test_fingerprints.py enforces it), so the batch size stays an execution setting. Subclasses supply the passes (`_passes`) and
the forward pass + decoding of one batch of jobs (`_run_jobs`).
"""

from __future__ import annotations

import itertools
import logging
from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from schemas.rows import RejectReason
from stages.detectors.base import ChunkPrompt, Detections, ImageInput, finalize
from stages.detectors.batching import autocast_dtype, inference_context, resolve_device, run_batched
from stages.detectors.postprocess import concat_entries, cxcywh_to_xyxy, entries_from_probs, sigmoid
from stages.detectors.prompts import Passes, PromptPass, caption_passes, positive_map, split_prompt

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

    def __init__(self, *, floor: float = 0.1, max_candidates: int = 100, chunk_candidates: int = 0,
                 batch_size: int = 8, device: str = "auto", precision: str = "fp32",
                 prompt: str = "caption", chunk_score: str = "mean"):
        if prompt not in ("caption", "chunks"):
            raise ValueError(f"prompt must be 'caption' or 'chunks', not {prompt!r}")
        if chunk_score not in ("mean", "max"):
            raise ValueError(f"chunk_score must be 'mean' or 'max', not {chunk_score!r}")
        self.floor = floor
        self.max_candidates = max_candidates
        self.chunk_candidates = chunk_candidates
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.amp_dtype = autocast_dtype(self.device, precision)
        self.prompt_form = prompt
        self.chunk_score = chunk_score
        self.unscored_chunks = 0  # chunks longer than the whole text budget (all calls), never scored

    @abstractmethod
    def _passes(self, prompt: ChunkPrompt) -> Passes:
        """The prompt passes of one image (none when it has no chunk text)."""

    @abstractmethod
    def _run_jobs(self, jobs: Sequence[Job]) -> list[tuple[np.ndarray, ...]]:
        """Raw entries (box, chunk, xyxy, score, box_score) of each job, from one batched forward pass."""

    def _batch_key(self, job: Job) -> Hashable:
        """Jobs with equal keys may share a forward pass: those of one pixel size need no padding."""
        return job.pixels.shape[:2]

    def detect(self, images: Sequence[ImageInput], prompts: Sequence[ChunkPrompt]) -> list[Detections]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        jobs: list[Job] = []
        for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
            if image.pixels is None:
                raise ValueError(f"row {image.key!r}: this detector needs decoded pixels")
            planned = self._passes(prompt)
            if planned.too_long:
                self.unscored_chunks += len(planned.too_long)
                log.warning("row %r: %d chunk(s) longer than the text budget of %s tokens are not scored",
                            image.key, len(planned.too_long), getattr(self, "max_text_tokens", "?"))
            for k, p in enumerate(planned.passes):
                jobs.append(Job(i, k, p, image.pixels, len(prompt.phrases)))
        # a fixed order (batch key, then image, pass), so results are reproducible
        jobs.sort(key=lambda j: (self._batch_key(j), j.image, j.index))
        entries: list[tuple[np.ndarray, ...]] = []
        with inference_context(self.device, self.amp_dtype):
            for _, group in itertools.groupby(jobs, key=self._batch_key):
                found, self.batch_size = run_batched(list(group), self.batch_size, self._run_jobs)
                entries.extend(found)
        per_image: list[list[tuple[np.ndarray, ...]]] = [[] for _ in images]
        for job, e in zip(jobs, entries, strict=True):
            per_image[job.image].append(e)
        out = []
        for parts in per_image:
            if not parts:
                out.append(Detections.empty(RejectReason.NO_DETECTION, "no chunk text to ground"))
                continue
            out.append(finalize(*concat_entries(parts), floor=self.floor, max_candidates=self.max_candidates,
                                chunk_candidates=self.chunk_candidates))
        return out


class TokenGroundingDetector(BatchedDetector):
    """GroundingDINO-style models: one text prompt per pass, a score per (query, token), boxes as
    normalized cxcywh of each image's unpadded region. Subclasses set `tokenizer`, `max_text_tokens`,
    and implement `_forward`."""

    tokenizer = None
    max_text_tokens: int = 256
    num_queries: int = 900

    def _offsets(self, text: str) -> list[tuple[int, int]]:
        return [tuple(o) for o in self.tokenizer(text, add_special_tokens=False,
                                                 return_offsets_mapping=True)["offset_mapping"]]

    def _count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _passes(self, prompt: ChunkPrompt) -> Passes:
        specials = self.tokenizer.num_special_tokens_to_add(pair=False)
        if self.prompt_form == "caption":
            if not prompt.caption and prompt.phrases:
                raise ValueError("detect.prompt=caption needs each prompt's caption (ChunkPrompt.from_caption)")
            return caption_passes(prompt.caption, prompt.spans, self._offsets, self.max_text_tokens, specials)
        return split_prompt(prompt.phrases, self._count_tokens, self.max_text_tokens, specials)

    def _tokenize(self, texts: list[str]):
        encoding = self.tokenizer(texts, padding="longest", return_offsets_mapping=True, return_tensors="pt")
        if encoding["input_ids"].shape[1] > self.max_text_tokens:  # passes are built to fit: a bug if not
            raise RuntimeError(f"a prompt of {encoding['input_ids'].shape[1]} tokens exceeds the text budget "
                               f"{self.max_text_tokens}: {texts}")
        return encoding

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
            pos_map = positive_map(offsets[b][:n], job.prompt, job.n_chunks)
            probs = sigmoid(logits[b, :, :n])
            out.append(entries_from_probs(probs, pos_map, cxcywh_to_xyxy(boxes[b]), job.n_chunks, self.floor,
                                          first_box=job.index * logits.shape[1], rule=self.chunk_score))
        return out
