"""Detector backends behind one `Detector` protocol (`detect(images, prompts) -> [Detections]`).

`build_detector(config, execution)` makes the backend a `DetectConfig` names: `groundingdino` (official package),
`hf` (transformers GroundingDINO / OWLv2) or `replay` (precomputed boxes). `resize_spec(config)` says
which input size the backend's images are decoded to — needed by the CPU decode step, which runs
without the model. Backends import torch/transformers lazily, so `replay` runs without them loaded.
See README.md in this folder for the protocol, the replay schema and how a GLIP backend would plug in.
"""

from __future__ import annotations

from functools import lru_cache

from stages.detectors.base import ChunkPrompt, Detections, Detector, ImageInput, finalize
from stages.detectors.config import DetectConfig, DetectExecution
from stages.images import ResizeSpec

__all__ = ["ChunkPrompt", "Detections", "Detector", "ImageInput", "build_detector", "finalize", "resize_spec"]


def build_detector(config: DetectConfig, execution: DetectExecution | None = None) -> Detector:
    execution = execution if execution is not None else DetectExecution()
    scoring = {"floor": config.floor, "max_candidates": config.max_candidates,
               "chunk_candidates": config.chunk_candidates}
    if config.backend == "replay":
        from stages.detectors.replay import ReplayDetector

        return ReplayDetector(path=config.replay_path, mode=config.replay_mode, **scoring)
    runtime = {**scoring, "batch_size": execution.batch_size, "device": execution.device,
               "precision": config.precision, "prompt": config.prompt, "chunk_score": config.chunk_score}
    if config.backend == "hf":
        if not config.hf_model:
            raise ValueError("detect.backend=hf needs detect.hf_model (a local directory or a model id)")
        from stages.detectors.hf import load_hf_detector

        return load_hf_detector(config.hf_model, max_text_tokens=config.max_text_tokens, **runtime)
    if config.backend == "groundingdino":
        from stages.detectors.groundingdino_official import OfficialGroundingDino

        return OfficialGroundingDino(config_file=config.gd_config, checkpoint=config.gd_checkpoint,
                                     text_encoder=config.gd_text_encoder, overrides=config.gd_overrides,
                                     max_text_tokens=config.max_text_tokens, **runtime)
    raise ValueError(f"unknown detect backend {config.backend!r}")


@lru_cache(maxsize=16)
def _hf_owl_image_size(model: str) -> int | None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model)
    return int(cfg.vision_config.image_size) if cfg.model_type == "owlv2" else None


def resize_spec(config: DetectConfig) -> ResizeSpec | None:
    """The size `prepare_batch` decodes images to; None for backends that need no pixels."""
    if config.backend == "replay":
        return None
    if config.backend == "hf" and config.hf_model:
        owl_size = _hf_owl_image_size(config.hf_model)
        if owl_size is not None:  # OWLv2: longer side to its square input; it pads the rest
            return ResizeSpec(size=config.input_size or owl_size, max_size=None, mode="longer")
    return ResizeSpec(size=config.input_size or 800, max_size=config.max_size, mode="shorter")
