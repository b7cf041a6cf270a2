"""Checkpoints: model weights as safetensors, optimizer/scheduler/RNG state, and everything needed to
resume or evaluate, in a self-contained folder per step (local path or any fsspec URL)::

    <out>/checkpoints/step-0000500/
        model.safetensors     weights
        optimizer.pt          AdamW + LR-scheduler state, torch RNG state
        trainer_state.json    step, data position (epoch, batches into it), running mean training box
        config.json           the resolved TrainConfig (model.vocab_size filled in)
        tokenizer.json        the tokenizer, never rebuilt on resume
    <out>/latest              relative path of the newest complete checkpoint, written last

`latest` is the commit marker, as `_done/` markers are in the pipeline: a crash while writing a checkpoint
leaves the previous one in force.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field

import fsspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from grit_pipeline.errors import UserError, reading
from grit_pipeline.train.config import TrainConfig
from grit_pipeline.train.model import GroundedLM
from grit_pipeline.train.tokenizer import GroundedTokenizer

LATEST = "latest"


class NoCheckpoint(UserError, FileNotFoundError):
    """The path holds no checkpoint (neither `latest` nor model.safetensors)."""


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # data epoch the next batch comes from
    batches_in_epoch: int = 0  # batches of that epoch already consumed
    box_sum: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])  # of training target boxes
    box_count: int = 0
    last_loss: float | None = None
    rank_positions: list[list[int]] = field(default_factory=list)  # [epoch, batches_in_epoch] per rank

    def mean_box(self) -> tuple[float, float, float, float] | None:
        if not self.box_count:
            return None
        return tuple(v / self.box_count for v in self.box_sum)  # type: ignore[return-value]


def _write(fs, path: str, data: bytes) -> None:
    with fs.open(path, "wb") as f:
        f.write(data)


def save_checkpoint(out: str, model: GroundedLM, optimizer: torch.optim.Optimizer, scheduler,
                    tokenizer: GroundedTokenizer, config: TrainConfig, state: TrainerState,
                    keep: int = 2) -> str:
    """Write a step folder, then point `latest` at it, then prune all but the newest `keep`. Returns the
    folder's URL."""
    fs, root = fsspec.core.url_to_fs(out)
    rel = f"checkpoints/step-{state.step:07d}"
    d = f"{root}/{rel}"
    fs.makedirs(d, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _write(fs, f"{d}/model.safetensors", save_safetensors(weights))
    buf = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, buf)
    _write(fs, f"{d}/optimizer.pt", buf.getvalue())
    _write(fs, f"{d}/trainer_state.json", json.dumps(asdict(state), indent=1).encode())
    _write(fs, f"{d}/config.json", config.model_dump_json(indent=1).encode())
    _write(fs, f"{d}/tokenizer.json", tokenizer.to_json().encode())
    _write(fs, f"{root}/{LATEST}", rel.encode())
    steps = sorted(p for p in fs.ls(f"{root}/checkpoints", detail=False) if p.rsplit("/", 1)[-1].startswith("step-"))
    for old in steps[:-keep] if keep > 0 else []:
        fs.rm(old, recursive=True)
    return fs.unstrip_protocol(d)


def resolve_checkpoint(path: str) -> str | None:
    """The step folder meant by `path`: a run folder (its `latest`) or a step folder itself; None when
    `path` holds no checkpoint yet."""
    fs, root = fsspec.core.url_to_fs(path)
    root = root.rstrip("/")
    if fs.exists(f"{root}/{LATEST}"):
        with fs.open(f"{root}/{LATEST}", "r") as f, reading(f"{path}/{LATEST}", "checkpoint pointer", ValueError):
            return fs.unstrip_protocol(f"{root}/{f.read().strip()}")
    if fs.exists(f"{root}/model.safetensors"):
        return fs.unstrip_protocol(root)
    return None


def _read(ckpt: str, name: str, mode: str = "rb"):
    with fsspec.open(f"{ckpt}/{name}", mode) as f:
        return f.read()


def load_checkpoint(path: str, map_location: str | torch.device = "cpu"
                    ) -> tuple[GroundedLM, GroundedTokenizer, TrainConfig, TrainerState, str]:
    """(model with weights loaded, tokenizer, config, trainer state, step folder) from a run or step folder."""
    ckpt = resolve_checkpoint(path)
    if ckpt is None:
        raise NoCheckpoint(f"{path}: no checkpoint (expected a training output folder with a `{LATEST}` file, or a "
                           "step folder with model.safetensors)")
    # what a missing, truncated or foreign file in the folder raises (pydantic's ValidationError and JSON
    # errors are ValueErrors; load_state_dict says RuntimeError on mismatched weights)
    with reading(ckpt, "checkpoint", FileNotFoundError, ValueError, TypeError, KeyError, RuntimeError,
                 SafetensorError):
        config = TrainConfig.model_validate_json(_read(ckpt, "config.json", "r"))
        tokenizer = GroundedTokenizer.from_json(_read(ckpt, "tokenizer.json", "r"))
        state = TrainerState(**json.loads(_read(ckpt, "trainer_state.json", "r")))
        model = GroundedLM(config.model)
        model.load_state_dict(load_safetensors(_read(ckpt, "model.safetensors")))
    return model.to(map_location), tokenizer, config, state, ckpt


def load_optimizer_state(ckpt: str, optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Restore optimizer, scheduler and RNG state saved beside the weights."""
    # torch.load(weights_only=True) refuses a file that is not a checkpoint with pickle's UnpicklingError,
    # named through torch so that this module imports no unpickler
    with reading(ckpt, "checkpoint", FileNotFoundError, ValueError, TypeError, KeyError, RuntimeError,
                 torch.serialization.pickle.UnpicklingError):
        blob = torch.load(io.BytesIO(_read(ckpt, "optimizer.pt")), map_location="cpu", weights_only=True)
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    if blob["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
