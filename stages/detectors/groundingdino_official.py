"""`groundingdino` backend: the official IDEA-Research GroundingDINO code (the `groundingdino` package of
groundingdino-py 0.4.0), built from its Python config file and loaded from a checkpoint.

The package runs its pure-PyTorch multi-scale deformable attention (no compiled extension needed) on
CPU and GPU. It tokenizes the prompt itself with `model.tokenizer`; we tokenize the same text with the
same tokenizer for the token -> chunk map, so positions agree.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem

from stages.detectors.batching import pad_images
from stages.detectors.grounding import IMAGENET_MEAN, IMAGENET_STD, TokenGroundingDetector
from stages.detectors.weights import load_state_dict

log = logging.getLogger(__name__)


def default_config_file() -> str:
    import groundingdino.config

    return str(Path(groundingdino.config.__file__).parent / "GroundingDINO_SwinT_OGC.py")


def _local_copy(url: str, stack: contextlib.ExitStack) -> str:
    """A local path for `url` (SLConfig only reads local files)."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return path
    tmp = stack.enter_context(tempfile.TemporaryDirectory())
    local = os.path.join(tmp, os.path.basename(path))
    fs.get(path, local)
    return local


def fix_text_mask_order(model: torch.nn.Module) -> int:
    """Make the package's text-enhancer layers batch-safe; returns how many layers were wrapped.

    `transformer_vanilla.TransformerEncoderLayer` expands the (B, T, T) sub-sentence mask to the
    (B * heads, T, T) that `nn.MultiheadAttention` wants with `mask.repeat(nhead, 1, 1)`, which orders it
    head-major while attention reads it batch-major: with different prompts in one batch, image i gets
    the masks of other images' prompts. `repeat_interleave` gives the right order; for one image or
    identical prompts both orders are the same, so single-image results do not change."""
    from groundingdino.models.GroundingDINO.transformer_vanilla import TransformerEncoderLayer

    wrapped = 0
    for layer in model.modules():
        if not isinstance(layer, TransformerEncoderLayer):
            continue
        original = layer.forward

        def forward(src, src_mask=None, src_key_padding_mask=None, pos=None, _layer=layer, _original=original):
            if src_mask is not None and src_mask.dim() == 3 and src_mask.shape[0] == src.shape[1]:
                src_mask = src_mask.repeat_interleave(_layer.nhead, dim=0)
            return _original(src, src_mask=src_mask, src_key_padding_mask=src_key_padding_mask, pos=pos)

        layer.forward = forward
        wrapped += 1
    return wrapped


class OfficialGroundingDino(TokenGroundingDetector):
    def __init__(self, *, config_file: str | None = None, checkpoint: str | None = None,
                 text_encoder: str | None = None, overrides: Mapping[str, Any] | None = None,
                 max_text_tokens: int | None = None, **kwargs):
        super().__init__(**kwargs)
        from groundingdino.models import build_model
        from groundingdino.util.slconfig import SLConfig

        with contextlib.ExitStack() as stack:
            # the config is a Python file the package executes: use trusted configs only
            args = SLConfig.fromfile(_local_copy(config_file or default_config_file(), stack))
        args.device = str(self.device)
        args.use_checkpoint = False  # gradient checkpointing: training only
        args.use_transformer_ckpt = False
        if text_encoder:
            args.text_encoder_type = text_encoder
        for key, value in (overrides or {}).items():
            setattr(args, key, value)
        # random-weight builds (tests, benchmarks) are reproducible, without touching the caller's RNG
        with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()):
            torch.manual_seed(0)
            model = build_model(args)  # (the package prints its text encoder path: silenced)
        if checkpoint:
            result = model.load_state_dict(load_state_dict(checkpoint), strict=False)
            if result.missing_keys:
                log.warning("%s: %d model weights missing from the checkpoint (e.g. %s)", checkpoint,
                            len(result.missing_keys), result.missing_keys[:3])
            if len(result.missing_keys) > len(model.state_dict()) // 2:
                raise ValueError(f"{checkpoint}: most GroundingDINO weights are missing; wrong checkpoint "
                                 f"for config {config_file or default_config_file()}?")
        else:
            log.warning("groundingdino backend without a checkpoint: random weights (tests/benchmarks only)")
        fix_text_mask_order(model)
        self.model = model.eval().to(self.device)
        self.tokenizer = model.tokenizer
        self.tokenizer.padding_side = "right"
        self.num_queries = int(args.num_queries)
        budget = int(getattr(model, "max_text_len", 256))
        self.max_text_tokens = min(max_text_tokens, budget) if max_text_tokens else budget

    def _forward(self, pixels: list[np.ndarray], texts: list[str], encoding) -> tuple[torch.Tensor, torch.Tensor]:
        from groundingdino.util.misc import NestedTensor

        batch, valid = pad_images(pixels, IMAGENET_MEAN, IMAGENET_STD, self.device)
        out = self.model(NestedTensor(batch, ~valid), captions=texts)  # its mask is True on padding
        return out["pred_logits"], out["pred_boxes"]
