"""`hf` backend: Hugging Face transformers zero-shot detectors, from a local directory or a model id.

- `GroundingDinoForObjectDetection` (model_type "grounding-dino", e.g. IDEA-Research/grounding-dino-tiny):
  one text prompt per pass (`detect.prompt`: the caption, or the chunks joined), scores per token, each
  chunk's score the mean (or max, `detect.chunk_score`) over its tokens, like the official code.
- `Owlv2ForObjectDetection` (model_type "owlv2", e.g. google/owlv2-base-patch16-ensemble): one text
  query per chunk (the chunk's own text, whitespace collapsed; its CLIP tokenizer lower-cases it), so
  each query's score is directly that chunk's score: `detect.prompt` and `detect.chunk_score` do not apply
  (OWLv2 has no caption form; a query longer than its 16-token text window is cut by the tokenizer, as
  transformers' own processor does). OWLv2 sees the image padded to a square (grey) at
  `vision_config.image_size`, the same canvas whatever the batch; its boxes are mapped back to the
  original image.

The directory needs the model's config + weights and its tokenizer files (a fast tokenizer: we need
offsets). Image normalization follows the model's preprocessor_config.json when present.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from stages.detectors.base import ChunkPrompt
from stages.detectors.batching import pad_images
from stages.detectors.grounding import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchedDetector,
    Job,
    TokenGroundingDetector,
)
from stages.detectors.postprocess import cxcywh_to_xyxy, entries_from_probs, sigmoid
from stages.detectors.prompts import Passes, build_prompt

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OWL_PAD_GREY = (0.5, 0.5, 0.5)


def hf_model_type(model: str) -> str:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model).model_type


def _normalization(model: str, default_mean, default_std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(model)
        return tuple(proc.image_mean), tuple(proc.image_std)
    except Exception:  # no preprocessor_config.json (e.g. a bare test model): the family's constants
        return default_mean, default_std


def hf_post_process(processor, outputs, *, threshold: float, text_threshold: float, target_sizes, input_ids):
    """transformers' `post_process_grounded_object_detection`, whichever name its box threshold has
    (`box_threshold` before 4.51, `threshold` after). We post-process from logits ourselves; this wrapper
    is kept to cross-check that in tests against the library's own results."""
    import inspect

    fn = processor.post_process_grounded_object_detection
    name = "threshold" if "threshold" in inspect.signature(fn).parameters else "box_threshold"
    return fn(outputs, input_ids=input_ids, text_threshold=text_threshold, target_sizes=target_sizes,
              **{name: threshold})


def load_hf_detector(model: str, *, max_text_tokens: int | None = None, **kwargs) -> BatchedDetector:
    kind = hf_model_type(model)
    if kind == "grounding-dino":
        return HFGroundingDino(model, max_text_tokens=max_text_tokens, **kwargs)
    if kind == "owlv2":
        return HFOwlv2(model, **kwargs)
    raise ValueError(f"{model}: model_type {kind!r} is not supported by the hf backend "
                     "(supported: grounding-dino, owlv2)")


class HFGroundingDino(TokenGroundingDetector):
    def __init__(self, model: str, *, max_text_tokens: int | None = None, **kwargs):
        super().__init__(**kwargs)
        from transformers import AutoTokenizer, GroundingDinoForObjectDetection

        self.tokenizer = AutoTokenizer.from_pretrained(model, use_fast=True)
        if not self.tokenizer.is_fast:
            raise ValueError(f"{model}: needs a fast tokenizer (tokenizer.json or vocab.txt) for offsets")
        self.tokenizer.padding_side = "right"
        self.model = GroundingDinoForObjectDetection.from_pretrained(model).eval().to(self.device)
        self.mean, self.std = _normalization(model, IMAGENET_MEAN, IMAGENET_STD)
        budget = int(self.model.config.max_text_len)
        self.max_text_tokens = min(max_text_tokens, budget) if max_text_tokens else budget
        self.num_queries = int(self.model.config.num_queries)

    def _forward(self, pixels: list[np.ndarray], texts: list[str], encoding) -> tuple[torch.Tensor, torch.Tensor]:
        batch, valid = pad_images(pixels, self.mean, self.std, self.device)
        inputs = {k: v.to(self.device) for k, v in encoding.items() if k != "offset_mapping"}
        if "token_type_ids" not in inputs:
            inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        out = self.model(pixel_values=batch, pixel_mask=valid.long(), **inputs)
        return out.logits, out.pred_boxes


class HFOwlv2(BatchedDetector):
    def __init__(self, model: str, **kwargs):
        super().__init__(**kwargs)
        from transformers import AutoTokenizer, Owlv2ForObjectDetection

        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = Owlv2ForObjectDetection.from_pretrained(model).eval().to(self.device)
        self.image_size = int(self.model.config.vision_config.image_size)
        self.query_tokens = int(self.model.config.text_config.max_position_embeddings)
        self.mean, self.std = _normalization(model, CLIP_MEAN, CLIP_STD)

    def _passes(self, prompt: ChunkPrompt) -> Passes:
        # one query per chunk, all in one pass (build_prompt keeps the non-empty chunks and their ids)
        p = build_prompt(prompt.phrases)
        return Passes([p] if p.chunk_ids else [])

    def _batch_key(self, job: Job) -> int:
        return 0  # every image is padded to the same square canvas: any jobs batch together

    def _square(self, pixels: np.ndarray) -> np.ndarray:
        """Longer side to the model's image size (already so when prepared with the OWLv2 resize spec)."""
        h, w = pixels.shape[:2]
        if max(h, w) == self.image_size:
            return pixels
        scale = self.image_size / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))

    def _run_jobs(self, jobs: Sequence[Job]) -> list[tuple[np.ndarray, ...]]:
        images = [self._square(j.pixels) for j in jobs]
        batch, _ = pad_images(images, self.mean, self.std, self.device, size=(self.image_size,) * 2,
                              pad_value=OWL_PAD_GREY)
        n_queries = max(len(j.prompt.chunk_ids) for j in jobs)
        input_ids = torch.zeros((len(jobs), n_queries, self.query_tokens), dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for b, job in enumerate(jobs):
            phrases = [job.prompt.text[s:e] for s, e in job.prompt.char_spans]
            enc = self.tokenizer(phrases, padding="max_length", truncation=True, max_length=self.query_tokens,
                                 return_tensors="pt")
            input_ids[b, :len(phrases)] = enc["input_ids"]
            attention[b, :len(phrases)] = enc["attention_mask"]
        # padded query slots stay all-zero ids: the model masks queries whose first id is 0
        out = self.model(input_ids=input_ids.view(-1, self.query_tokens).to(self.device),
                         attention_mask=attention.view(-1, self.query_tokens).to(self.device),
                         pixel_values=batch)
        logits = out.logits.float().cpu().numpy()
        boxes = out.pred_boxes.float().cpu().numpy()
        result = []
        for b, (job, img) in enumerate(zip(jobs, images, strict=True)):
            q = len(job.prompt.chunk_ids)
            xyxy = cxcywh_to_xyxy(boxes[b])  # normalized to the padded square
            h, w = img.shape[:2]
            xyxy = np.clip(xyxy * np.array([self.image_size / w, self.image_size / h] * 2), 0.0, 1.0)
            token_chunk = np.asarray(job.prompt.chunk_ids, np.int32)  # query i is chunk chunk_ids[i]
            result.append(entries_from_probs(sigmoid(logits[b, :, :q]), token_chunk, xyxy, job.n_chunks,
                                             self.floor, first_box=0, rule="max"))  # one "token" per chunk
        return result
