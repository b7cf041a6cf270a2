"""Batching helpers for the model backends: device and precision choice, padding images into one tensor
with a padding mask, and running work in batches that halve on CUDA out-of-memory.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for `DetectConfig.precision`: None for "fp32" (no autocast: the references'
    numerics), bfloat16 for "bf16", float16 for "fp16", on whatever device runs the model (CPU autocast
    included), so that the fingerprinted setting is what actually ran."""
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"precision must be one of {sorted(dtypes)}, not {precision!r}")
    return dtypes[precision]


def inference_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    if dtype is not None:
        stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
    return stack


def pad_images(pixels: Sequence[np.ndarray], mean: Sequence[float], std: Sequence[float],
               device: torch.device, size: tuple[int, int] | None = None,
               pad_value: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W, 3) uint8 images of any sizes -> normalized (B, 3, Hmax, Wmax) float tensor, images at the
    top-left, and a (B, Hmax, Wmax) bool mask that is True on real pixels.

    Padding is 0 after normalization (the mean colour) unless `pad_value` (in [0, 1] RGB) is given.
    Conversion and normalization run on `device`, so only uint8 bytes cross the bus."""
    if size is None:
        size = (max(p.shape[0] for p in pixels), max(p.shape[1] for p in pixels))
    hmax, wmax = size
    mean_t = torch.tensor(mean, device=device, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, device=device, dtype=torch.float32).view(3, 1, 1)
    batch = torch.zeros((len(pixels), 3, hmax, wmax), device=device, dtype=torch.float32)
    if pad_value is not None:
        fill = (torch.tensor(pad_value, device=device, dtype=torch.float32).view(3, 1, 1) - mean_t) / std_t
        batch += fill
    mask = torch.zeros((len(pixels), hmax, wmax), device=device, dtype=torch.bool)
    for i, p in enumerate(pixels):
        h, w = p.shape[:2]
        img = torch.tensor(p, device=device)  # copies: decoded buffers are read-only
        img = img.permute(2, 0, 1).to(torch.float32).div_(255.0)
        batch[i, :, :h, :w] = (img - mean_t) / std_t
        mask[i, :h, :w] = True
    return batch, mask


def is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def run_batched(items: Sequence[T], batch_size: int, fn: Callable[[Sequence[T]], list[R]],
                on_shrink: Callable[[int], None] | None = None) -> tuple[list[R], int]:
    """`fn` over `items` in consecutive batches of `batch_size`; `fn` returns one result per item.

    On CUDA out-of-memory the failed batch is retried at half its size; the smaller size is
    kept for the rest (memory does not come back within one run) and returned so the caller can keep
    it too. Out-of-memory at batch size 1 is raised."""
    results: list[R] = []
    start = 0
    size = max(1, int(batch_size))
    while start < len(items):
        chunk = items[start:start + size]
        try:
            out = fn(chunk)
        except Exception as e:
            if not is_oom(e) or size == 1:
                raise
            size = max(1, len(chunk) // 2)
            log.warning("CUDA out of memory on a batch of %d; retrying with batch size %d", len(chunk), size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if on_shrink is not None:
                on_shrink(size)
            continue
        if len(out) != len(chunk):
            raise RuntimeError(f"batch function returned {len(out)} results for {len(chunk)} items")
        results.extend(out)
        start += len(chunk)
    return results, size
