"""The trainer's configuration: one pydantic model, loadable from YAML, overridable with dotted keys
(`model.dim=256`, `lr=3e-4`) exactly like the pipeline's stage configs."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from grit_pipeline.config import load_settings
from grit_pipeline.train.choices import check_device
from grit_pipeline.train.model import ModelConfig
from stages.image_refs import ExternalImages


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: ModelConfig = Field(default_factory=ModelConfig)
    # "bpe": byte-level BPE trained on the first `tokenizer_sample_rows` captions of the training shards;
    # "byte": bytes only, no training. Both add the tag and location tokens.
    tokenizer: Literal["bpe", "byte"] = "bpe"
    bpe_vocab_size: int = 2048
    tokenizer_sample_rows: int = 50_000

    steps: int = Field(1200, ge=1)
    # Per rank. 64: in the README's recipe (1,200 steps) batches of 32 learnt to ground on some seeds only
    # (held-out accuracy 0.84, 0.09, 0.61, 0.21 for seeds 0-3), batches of 64 on seeds 0-4 (0.76-0.96).
    batch_size: int = Field(64, ge=1)
    lr: float = 3e-3  # right for the small default model; lower it for larger ones
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    seed: int = 0
    # Fraction of rows trained on their grounded caption (`<grounding>` + tags); the rest train on the
    # plain caption. Kosmos-2 mixes grounded and plain image-text data (the paper does not give the ratio).
    # The default trains every row grounded: in the README's recipe (1,200 steps, batches of 32, seed 0)
    # 0.5 left the model at a grounding accuracy of 0.08 where 1.0 reached 0.84 (the mean box: 0.025).
    grounding_fraction: float = Field(1.0, ge=0.0, le=1.0)

    num_workers: int = 1
    shuffle_buffer: int = 1000
    on_missing_image: Literal["skip", "error"] = "skip"
    # Image references outside a shard's own folder (and, for a run's final shards, outside what the run
    # allowed) that may be read: URI prefixes (["s3://my-images/"]) or true for any local path or object
    # store; http(s) never (`grit_pipeline.train.images`, `stages.image_refs`).
    external_images: ExternalImages = False
    device: Annotated[str, AfterValidator(check_device)] = "auto"  # auto | cpu | cuda | cuda:N
    # torch intra-op threads of the training process (None or 0: torch's default, one per core). 1 by
    # default: on a CPU shared with other jobs, oversubscribed OpenMP threads made steps ~15x slower here.
    # Raise it (or set None) on a machine of your own or for a larger model.
    torch_threads: int | None = 1
    log_every: int = 25
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    time_limit_s: float | None = None  # stop (and checkpoint) early once training has run this long


def load_config(path: str | None = None, overrides: list[str] | None = None, *, defaults: dict | None = None,
                **fields) -> TrainConfig:
    """A TrainConfig from `defaults`, then an optional YAML file, then `key=value` overrides (values parsed
    as YAML), then keyword fields that are not None (the CLI's flags). The same loader as the pipeline's
    (`grit_pipeline.config.load_settings`): unknown keys and bad values raise `ConfigError` naming the key."""
    flags = [f"{key}={json.dumps(value)}" for key, value in fields.items() if value is not None]
    return load_settings(TrainConfig, path, [*(overrides or []), *flags], defaults)
