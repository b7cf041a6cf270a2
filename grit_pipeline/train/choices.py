"""The trainer's fixed value sets -- the devices it runs on, the layouts `grit export` writes -- in a module
that imports nothing heavy, so the `grit` CLI offers them as choices at start-up and the settings that
take them (`TrainConfig.device`, `export_kosmos2(fmt=...)`) check them against the same definitions."""

from __future__ import annotations

import re
from typing import Literal

# `auto`: the local rank's GPU when CUDA is available, else the CPU; `cuda`: the local rank's GPU.
DEVICES = ("auto", "cpu", "cuda", "cuda:N")
DEVICE_PATTERN = r"auto|cpu|cuda(:[0-9]+)?"

ExportFormat = Literal["imagefolder", "parquet"]


def check_device(value: str) -> str:
    """`value` when it names a device the trainer can use; ValueError naming the accepted forms otherwise."""
    if not re.fullmatch(DEVICE_PATTERN, value):
        raise ValueError(f"device {value!r} is not one of {' | '.join(DEVICES)}")
    return value
