"""Tiny settings for smoke tests of the trainer (ours and users'): a model that trains a step in
milliseconds and a few small synthetic shards."""

from __future__ import annotations

from grit_pipeline.train.config import TrainConfig, load_config
from grit_pipeline.train.synth import SynthConfig, write_synth

TINY_MODEL = {"image_size": 32, "patch_size": 16, "stem_channels": 8, "dim": 32, "heads": 2, "layers": 1,
              "vision_layers": 1, "mlp_ratio": 2, "max_text_tokens": 64}


def tiny_config(**fields) -> TrainConfig:
    """A TrainConfig for a ~100k-parameter model; keyword fields override (dotted keys via `model`)."""
    base = {"model": dict(TINY_MODEL), "tokenizer": "byte", "batch_size": 4, "num_workers": 0,
            "shuffle_buffer": 16, "warmup_steps": 2, "lr": 3e-3, "log_every": 1, "checkpoint_every": 1000,
            "steps": 4, "device": "cpu",
            "torch_threads": 1}
    base.update(fields)
    return load_config(**{k: v for k, v in base.items() if k != "model"}, model=base["model"])


def tiny_shards(out: str, shards: int = 4, rows: int = 12, seed: int = 0, embed_images: bool = False) -> list[str]:
    """Small synthetic GrIT shards with small images."""
    return write_synth(out, SynthConfig(shards=shards, rows_per_shard=rows, seed=seed, min_side=40, max_side=64,
                                        embed_images=embed_images))


def ddp_worker(rank: int, world_size: int, port: int, shards: str, out: str, steps: int, result_dir: str,
               stop_at: int | None = None) -> None:
    """One process of a CPU (gloo) DDP run, for `torch.multiprocessing.spawn`: trains the tiny model
    (resuming from `out` if it holds a checkpoint) and writes its summary to `<result_dir>/rank-<rank>.json`."""
    import json
    import os

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})
    from grit_pipeline.train.trainer import train

    summary = train(shards, out, tiny_config(steps=steps), progress=False, stop_at=stop_at)
    with open(f"{result_dir}/rank-{rank}.json", "w") as f:
        json.dump(summary, f)
