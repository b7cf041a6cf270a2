"""The tiny Kosmos-2-layout model: a small ViT whose patch embeddings are spliced into the token sequence
between `<image>` and `</image>`, and a causal transformer decoder over the whole sequence.

Kosmos-2 proper uses a CLIP ViT-L, a perceiver resampler to 64 image embeddings and a 1.3B decoder; this
keeps the layout (image embeddings replace the `<image_pad>` placeholders, one decoder for image and text,
the location tokens ordinary vocabulary entries of a tied output layer) at a size that trains on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from grit_pipeline.train import vocab
from grit_pipeline.train.dataset import IGNORE_INDEX


class ModelConfig(BaseModel):
    """Defaults: the ~0.4M-parameter model of `bench/train_grounding.py`, which learns synthetic grounding
    in minutes on one CPU thread. Scale `dim`, `layers` and `image_size` up for real GrIT."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = 0  # set from the tokenizer when training starts
    image_size: int = 64
    patch_size: int = 8
    vision_layers: int = 1
    # A per-pixel conv stem (3x3, stride 2, GELU) before the patch embedding gives the patchifier
    # non-linear colour/edge features to summarize; 0 = plain ViT patch embedding of raw pixels.
    stem_channels: int = 16
    dim: int = 96
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 2
    dropout: float = 0.0
    max_text_tokens: int = 64
    # Location-token embeddings start as 2-D sin-cos codes of their cell, so neighbouring cells start
    # similar (the output layer is tied, so their logits move together); "random" is the plain init.
    location_init: str = "sincos2d"
    # Each image embedding also gets the embedding of the location token of its patch's centre cell, so
    # image positions and location tokens share one geometry (the decoder can point at a patch by copying).
    patch_location_embeddings: bool = True

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def max_positions(self) -> int:
        return 3 + self.num_image_tokens + self.max_text_tokens + 1


def _layer(dim: int, heads: int, mlp_ratio: int, dropout: float) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(dim, heads, dim * mlp_ratio, dropout, activation="gelu",
                                      batch_first=True, norm_first=True)


def sincos_2d(rows: int, cols: int, dim: int) -> torch.Tensor:
    """[rows * cols, dim] fixed 2-D sine-cosine codes, half the channels for the row, half for the column."""
    quarter = dim // 4
    freq = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1)))
    r = torch.arange(rows, dtype=torch.float32).repeat_interleave(cols)[:, None] * freq
    c = torch.arange(cols, dtype=torch.float32).repeat(rows)[:, None] * freq
    code = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)
    return F.pad(code, (0, dim - code.shape[1]))


class VisionEncoder(nn.Module):
    """Patchify -> transformer encoder -> a linear connector into the decoder's embedding space."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        side = cfg.image_size // cfg.patch_size
        if cfg.stem_channels:
            if cfg.patch_size % 2:
                raise ValueError("patch_size must be even with a stem")
            self.stem = nn.Sequential(nn.Conv2d(3, cfg.stem_channels, 3, stride=2, padding=1), nn.GELU())
            k = cfg.patch_size // 2
            self.patch = nn.Conv2d(cfg.stem_channels, cfg.dim, kernel_size=k, stride=k)
        else:
            self.stem = nn.Identity()
            self.patch = nn.Conv2d(3, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.register_buffer("pos", sincos_2d(side, side, cfg.dim) * 0.1, persistent=False)
        self.blocks = nn.TransformerEncoder(_layer(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout),
                                            cfg.vision_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        self.connector = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch(self.stem(pixels)).flatten(2).transpose(1, 2) + self.pos
        return self.connector(self.norm(self.blocks(x)))


class GroundedLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= vocab.LOCATION_OFFSET + vocab.NUM_LOCATION_TOKENS:
            raise ValueError(f"vocab_size {cfg.vocab_size} cannot hold the tag and location tokens")
        self.cfg = cfg
        self.image_pad_id = vocab.TAG_TOKENS.index(vocab.IMAGE_PAD)
        self.vision = VisionEncoder(cfg)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.max_positions, cfg.dim)
        self.decoder = nn.TransformerEncoder(_layer(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout),
                                             cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        side = cfg.image_size // cfg.patch_size
        centre = ((torch.arange(side) + 0.5) * vocab.P / side).long()
        self.register_buffer("patch_location_ids", vocab.LOCATION_OFFSET + (centre[:, None] * vocab.P + centre[None]).flatten(),
                             persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # Token embeddings (and so the tied output layer) at norm ~1: logits h . e then span a useful range
        # from the start (GPT-2's std 0.02 makes the 1,024-way location softmax nearly flat for many
        # steps). The vision connector starts at the same scale, so an image embedding does not drown the
        # location-token embedding added to it.
        std = self.cfg.dim ** -0.5
        nn.init.normal_(self.tok_emb.weight, std=std)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        nn.init.normal_(self.vision.connector.weight, std=std / self.cfg.dim ** 0.5)
        nn.init.zeros_(self.vision.connector.bias)
        if self.cfg.location_init == "sincos2d":
            with torch.no_grad():
                code = sincos_2d(vocab.P, vocab.P, self.cfg.dim)
                self.tok_emb.weight[vocab.LOCATION_OFFSET: vocab.LOCATION_OFFSET + vocab.NUM_LOCATION_TOKENS] = (
                    code / code.std() * std)
        elif self.cfg.location_init != "random":
            raise ValueError(f"location_init must be 'sincos2d' or 'random', not {self.cfg.location_init!r}")

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(input_ids)
        slots = input_ids == self.image_pad_id
        image = self.vision(pixel_values)
        if self.cfg.patch_location_embeddings:
            image = image + self.tok_emb(self.patch_location_ids)
        if int(slots.sum()) != image.shape[0] * image.shape[1]:
            raise ValueError(f"each sequence needs exactly {image.shape[1]} {vocab.IMAGE_PAD} tokens")
        x = x.masked_scatter(slots.unsqueeze(-1), image.to(x.dtype))
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return x + self.pos_emb(positions)

    def hidden(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, T, dim]; position t predicts token t + 1."""
        if input_ids.shape[1] > self.cfg.max_positions:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds {self.cfg.max_positions}")
        x = self.embed(input_ids, pixel_values)
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device, dtype=x.dtype)
        return self.norm(self.decoder(x, mask=causal, is_causal=True))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.tok_emb.weight.T  # tied output layer

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Without labels: (logits [B, T, V], None). With labels: (None, mean next-token cross-entropy over
        labelled positions), computing the output layer only at those positions."""
        h = self.hidden(input_ids, pixel_values)
        if labels is None:
            return self.logits(h), None
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        return None, F.cross_entropy(self.logits(h[:, :-1][keep]), targets[keep])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

