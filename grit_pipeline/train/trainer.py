"""The training loop: AdamW with linear warmup and cosine decay, gradient clipping, periodic checkpoints,
resume, on CPU, one GPU, or several processes under `torchrun` (DDP; NCCL on GPUs, gloo on CPUs).

Training is counted in optimizer steps, not epochs: each rank cycles through its own shards epoch after
epoch, so ranks with unequal shard sizes never wait on each other. The data position (epoch, batches into
it) is saved with each checkpoint; a resumed run fast-forwards the loader to it (re-reading, but not
training on, that part of the epoch), so it continues the same sample stream and the same loss curve.
Output: `<out>/metrics.jsonl` (one line per logged step) and `<out>/checkpoints/` (see `checkpoint`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from grit_pipeline.train import vocab
from grit_pipeline.train.checkpoint import (
    LATEST,
    TrainerState,
    load_checkpoint,
    load_optimizer_state,
    resolve_checkpoint,
    save_checkpoint,
)
from grit_pipeline.train.config import TrainConfig
from grit_pipeline.train.dataset import GritStreamingDataset, SequenceLayout, collate, iter_rows, list_shards
from grit_pipeline.train.model import GroundedLM, count_parameters
from grit_pipeline.train.tokenizer import GroundedTokenizer

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    """This process's place among the training processes; sets up torch.distributed under torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def setup(cls, use_cuda: bool) -> DistContext:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
            owns = True
        else:
            owns = False
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def mean(self, value: float, device: torch.device) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when `flag` is true on some rank (so all ranks stop together)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def teardown(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def warmup_cosine(config: TrainConfig):
    """LR multiplier for the update after `step` earlier ones: linear warmup, then cosine to min_lr_ratio."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms and embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "emb" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def build_tokenizer(config: TrainConfig, shards: list[str]) -> GroundedTokenizer:
    """Deterministic from the shards: every rank builds the same one, no shared filesystem needed."""
    if config.tokenizer == "byte":
        return GroundedTokenizer.byte_level()

    def captions() -> Iterator[str]:
        n = 0
        for shard in shards:
            for row in iter_rows(shard, columns=("key", "caption")):
                yield row["caption"]
                n += 1
                if n >= config.tokenizer_sample_rows:
                    return

    return GroundedTokenizer.train(captions(), config.bpe_vocab_size)


def target_boxes(labels: torch.Tensor) -> list[tuple[float, float, float, float]]:
    """Boxes spelled by the location tokens among a batch's labels (consecutive pairs, per row)."""
    boxes = []
    lo, hi = vocab.LOCATION_OFFSET, vocab.LOCATION_OFFSET + vocab.NUM_LOCATION_TOKENS
    for row in labels.tolist():
        locs = [t - lo for t in row if lo <= t < hi]
        for ul, lr in zip(locs[0::2], locs[1::2], strict=False):
            try:
                boxes.append(vocab.decode_box(ul, lr))
            except ValueError:  # an inverted pair in the data: not a box
                continue
    return boxes


def _batches(loader: DataLoader, dataset: GritStreamingDataset, epoch: int, skip: int, seed: int
             ) -> Iterator[tuple[dict, int, int]]:
    """(batch, epoch, batches consumed in that epoch including this one), forever; skips `skip` batches of
    the first epoch (resume)."""
    while True:
        dataset.set_epoch(epoch)
        loader.generator.manual_seed(seed * 100_003 + epoch)  # worker base seeds; independent of the global RNG
        n = 0
        for batch in loader:
            n += 1
            if n > skip:
                yield batch, epoch, n
        if n == 0:
            raise RuntimeError(f"epoch {epoch} produced no batches: no readable rows in the shards")
        epoch, skip = epoch + 1, 0


def _rewrite_metrics(out: str, upto_step: int) -> None:
    """On resume, drop metric lines past the checkpoint (they will be logged again)."""
    path = f"{out}/metrics.jsonl"
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        return
    with fs.open(p, "r") as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= upto_step]
    with fs.open(p, "w") as f:
        f.writelines(kept)


def _clear_previous_run(out: str) -> None:
    """Starting from scratch in a folder that holds an earlier run (`resume=False`): remove its
    checkpoints and metrics, so they are not mixed with this run's."""
    fs, root = fsspec.core.url_to_fs(out)
    stale = [p for p in (f"{root}/{LATEST}", f"{root}/metrics.jsonl", f"{root}/checkpoints") if fs.exists(p)]
    if stale:
        log.warning("starting from scratch: removing the previous run's %s", ", ".join(stale))
    for p in stale:
        fs.rm(p, recursive=True)


def train(shards: str | list[str], out: str, config: TrainConfig, *, resume: bool = True,
          progress: bool = True, stop_at: int | None = None) -> dict:
    """Train (or resume training) on `shards`, writing checkpoints and metrics under `out`. `stop_at`
    ends this call (with a checkpoint) at that step while keeping the schedule of `config.steps`, for jobs
    run in slices. Returns a summary with this call's per-step losses (this rank's; the metrics file has
    the cross-rank mean)."""
    use_cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    ctx = DistContext.setup(use_cuda)
    try:
        return _train(shards, out.rstrip("/"), config, ctx, resume, progress, stop_at)
    finally:
        ctx.teardown()


def _train(shards, out: str, config: TrainConfig, ctx: DistContext, resume: bool, progress: bool,
           stop_at: int | None) -> dict:
    started = time.monotonic()  # the time limit covers setup (tokenizer, model) and any resume fast-forward
    device = pick_device(config.device, ctx.local_rank)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    shard_list = list_shards(shards)
    ckpt = resolve_checkpoint(out) if resume else None
    torch.manual_seed(config.seed)
    if ckpt:
        model, tokenizer, saved, state, ckpt = load_checkpoint(ckpt)
        if saved.model != config.model.model_copy(update={"vocab_size": saved.model.vocab_size}):
            log.warning("resuming %s: keeping the checkpoint's model config, not the one given", ckpt)
        config = config.model_copy(update={"model": saved.model, "tokenizer": saved.tokenizer})
    else:
        if ctx.is_main:
            _clear_previous_run(out)
        tokenizer = build_tokenizer(config, shard_list)
        config = config.model_copy(update={"model": config.model.model_copy(
            update={"vocab_size": tokenizer.vocab_size})})
        model = GroundedLM(config.model)
        state = TrainerState()
    model.to(device)
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if ctx.world_size > 1 else model
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config))
    if ckpt:
        load_optimizer_state(ckpt, optimizer, scheduler)
        if ctx.is_main:
            _rewrite_metrics(out, state.step)
        # each rank resumes at its own data position (ranks' shards differ in size)
        if len(state.rank_positions) == ctx.world_size:
            state.epoch, state.batches_in_epoch = state.rank_positions[ctx.rank]
        elif ctx.world_size > 1:
            log.warning("checkpoint was written by %d ranks, resuming with %d: data positions restart from "
                        "rank 0's", len(state.rank_positions), ctx.world_size)
    if ctx.is_main:
        log.info("model: %d parameters, vocab %d; %d shards; resume from %s", count_parameters(model),
                 tokenizer.vocab_size, len(shard_list), ckpt or "scratch")

    layout = SequenceLayout(config.model.num_image_tokens, config.model.max_text_tokens)
    dataset = GritStreamingDataset(
        shard_list, tokenizer, layout, config.model.image_size, seed=config.seed,
        shuffle_buffer=config.shuffle_buffer, grounding_fraction=config.grounding_fraction,
        rank=ctx.rank, world_size=ctx.world_size, on_missing_image=config.on_missing_image,
        external_images=config.external_images)
    loader = DataLoader(dataset, batch_size=config.batch_size, num_workers=config.num_workers,
                        collate_fn=collate, pin_memory=device.type == "cuda", generator=torch.Generator())
    stream = _batches(loader, dataset, state.epoch, state.batches_in_epoch, config.seed)

    if ctx.is_main:
        fs, root = fsspec.core.url_to_fs(out)
        fs.makedirs(root, exist_ok=True)
    f = fsspec.open(f"{out}/metrics.jsonl", "a").open() if ctx.is_main else None
    losses: list[float] = []
    bar = tqdm(total=config.steps, initial=state.step, desc="train", disable=not (progress and ctx.is_main))
    try:
        last = min(config.steps, stop_at) if stop_at is not None else config.steps
        while state.step < last:
            batch, state.epoch, state.batches_in_epoch = next(stream)
            labels = batch["labels"].to(device, non_blocking=True)
            model.train()
            _, loss = net(batch["input_ids"].to(device, non_blocking=True),
                          batch["pixel_values"].to(device, non_blocking=True), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            state.step += 1
            value = float(loss.detach())
            losses.append(value)
            state.last_loss = value
            for box in target_boxes(batch["labels"]):
                state.box_sum = [s + v for s, v in zip(state.box_sum, box, strict=True)]
                state.box_count += 1
            bar.update(1)
            if state.step % config.log_every == 0 or state.step == config.steps:
                mean_loss = ctx.mean(value, device)
                if f:
                    f.write(json.dumps({"step": state.step, "loss": round(mean_loss, 6),
                                        "lr": scheduler.get_last_lr()[0], "grad_norm": round(float(grad_norm), 4),
                                        "epoch": state.epoch}) + "\n")
                    f.flush()
                bar.set_postfix(loss=f"{mean_loss:.3f}")
            over_time = config.time_limit_s is not None and ctx.any(
                time.monotonic() - started > config.time_limit_s, device)
            if state.step % config.checkpoint_every == 0 or state.step == last or over_time:
                state.rank_positions = ctx.gather([state.epoch, state.batches_in_epoch])
                if ctx.is_main:
                    save_checkpoint(out, model, optimizer, scheduler, tokenizer, config, state,
                                    keep=config.keep_checkpoints)
                ctx.barrier()
            if over_time:
                log.info("time limit of %.0f s reached at step %d", config.time_limit_s, state.step)
                break
    finally:
        bar.close()
        if f:
            f.close()
    return {"steps": state.step, "losses": losses, "last_loss": state.last_loss,
            "seconds": time.monotonic() - started,
            "checkpoint": resolve_checkpoint(out), "parameters": count_parameters(model),
            # equal on every rank when DDP kept the replicas in sync
            "param_checksum": float(sum(p.detach().double().sum() for p in model.parameters()))}
