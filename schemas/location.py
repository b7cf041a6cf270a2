"""Kosmos-2 location tokens: a normalized box <-> a pair of patch indices on a 32 x 32 grid.

Used by `schemas.grounded_text` (the grounded-caption formats) and by `compose`, which writes the boxes
of every tagged phrase as `<patch_index_UL><patch_index_LR>`. The image is cut into P x P cells (P = 32,
1,024 tokens `<patch_index_0000>`..`<patch_index_1023>`); cell index = row * P + col, zero-padded to four
digits. A box is its upper-left cell and its lower-right cell.

Two encoders of a normalized xyxy box, selectable everywhere by name:

- `unilm` (default) -- the official Kosmos-2 training code (`get_box_coords_index` in microsoft/unilm
  `kosmos-2/unilm/data/vl/obj_utils.py`): `floor(v * P)` for both corners, the bottom-right corner first
  clamped to 0.99999 so that a box touching the right or bottom edge lands in the last cell.
- `hf` -- Hugging Face transformers' `coordinate_to_patch_index`: upper-left `floor(v * P)`, bottom-right
  `ceil(v * P - 1)`, i.e. a bottom-right corner lying exactly on a cell edge belongs to the cell before it.

They differ only when a bottom-right coordinate lies exactly on an inner cell edge (`v * P` a whole number
below P). Multiplying by P = 32 is exact in binary floating point, so "exactly" means exactly.

The decoder is transformers' `patch_index_to_coordinate` (itself copied from the official demo): cell
centres of both corners, or -- when both corners share a row or a column -- the whole cells, so that a
one-cell-wide box does not decode to a zero-width one. Consequence worth knowing: with whole-cell decoding
the bottom-right coordinate sits exactly on the next cell's edge, which `hf` maps back to the same cell but
`unilm` maps to the next one; `encode(decode(a, b), "hf") == (a, b)` for every valid pair, while `unilm`
round-trips exactly only pairs whose corners differ in both row and column (or touch the last row/column).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

P = 32  # cells per side
NUM_LOCATION_TOKENS = P * P
LocationEncoder = Literal["unilm", "hf"]
LOCATION_ENCODERS: tuple[str, ...] = ("unilm", "hf")

# The official code clamps the bottom-right corner to this value before flooring.
UNILM_MAX_COORD = 0.99999

_TOKEN_RE = re.compile(r"<patch_index_(\d{4})>")

Box = tuple[float, float, float, float]


def validate_box(box: Sequence[float]) -> Box:
    """Return `box` as a float 4-tuple; ValueError unless it is a finite, non-empty xyxy box in [0, 1]."""
    if len(box) != 4:
        raise ValueError(f"a box is 4 numbers (x1, y1, x2, y2), got {len(box)}: {tuple(box)!r}")
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"box coordinates must be numbers, got {tuple(box)!r}") from None
    for name, v in (("x1", x1), ("y1", y1), ("x2", x2), ("y2", y2)):
        if not math.isfinite(v):
            raise ValueError(f"box coordinate {name} is {v}; normalized boxes must be finite: {tuple(box)!r}")
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"box coordinate {name}={v} is outside [0, 1]; boxes must be normalized xyxy: "
                             f"{tuple(box)!r}")
    if not (x1 < x2 and y1 < y2):
        raise ValueError(f"box is inverted or empty (need x1 < x2 and y1 < y2): {tuple(box)!r}")
    return x1, y1, x2, y2


def encode_box(box: Sequence[float], encoder: LocationEncoder = "unilm") -> tuple[int, int]:
    """Normalized xyxy box -> (upper-left, lower-right) patch indices with the named encoder."""
    x1, y1, x2, y2 = validate_box(box)
    ul_col, ul_row = math.floor(x1 * P), math.floor(y1 * P)
    if encoder == "unilm":
        lr_col = math.floor(min(x2, UNILM_MAX_COORD) * P)
        lr_row = math.floor(min(y2, UNILM_MAX_COORD) * P)
    elif encoder == "hf":
        # max(..., 0): for x2 below ~1e-17, `x2 * P - 1` rounds to -1.0 and transformers would return -1.
        lr_col = max(math.ceil(x2 * P - 1), 0)
        lr_row = max(math.ceil(y2 * P - 1), 0)
    else:
        raise ValueError(f"unknown location encoder {encoder!r}; choose one of {', '.join(LOCATION_ENCODERS)}")
    return ul_row * P + ul_col, lr_row * P + lr_col


def _check_index(index: int) -> int:
    if type(index) is not int or not 0 <= index < NUM_LOCATION_TOKENS:  # `type`: no bools, no floats
        if type(index) is not int:
            raise ValueError(f"a patch index is an int, got {index!r}")
        raise ValueError(f"patch index {index} is outside [0, {NUM_LOCATION_TOKENS - 1}]")
    return index


def check_patch_pair(ul: int, lr: int) -> tuple[int, int]:
    """ValueError unless (ul, lr) are valid indices with the lower-right cell not above or left of the
    upper-left one."""
    _check_index(ul)
    _check_index(lr)
    if lr % P < ul % P or lr // P < ul // P:
        raise ValueError(f"patch pair ({ul}, {lr}) is inverted: cell (row {lr // P}, col {lr % P}) lies above or "
                         f"left of (row {ul // P}, col {ul % P})")
    return ul, lr


def decode_box(ul: int, lr: int) -> Box:
    """(upper-left, lower-right) patch indices -> normalized xyxy box (transformers' semantics)."""
    check_patch_pair(ul, lr)
    cell = 1.0 / P
    ul_col, ul_row = ul % P, ul // P
    lr_col, lr_row = lr % P, lr // P
    if ul_col == lr_col or ul_row == lr_row:  # includes ul == lr: whole cells
        return ul_col * cell, ul_row * cell, (lr_col + 1) * cell, (lr_row + 1) * cell
    return ((ul_col + 0.5) * cell, (ul_row + 0.5) * cell, (lr_col + 0.5) * cell, (lr_row + 0.5) * cell)


def cell_box(index: int) -> Box:
    """The normalized xyxy extent of one grid cell."""
    _check_index(index)
    col, row = index % P, index // P
    return col / P, row / P, (col + 1) / P, (row + 1) / P


def patch_index_token(index: int) -> str:
    """3 -> '<patch_index_0003>'."""
    return f"<patch_index_{_check_index(index):04d}>"


def parse_patch_index_token(token: str) -> int:
    """'<patch_index_0003>' -> 3; ValueError for anything else."""
    m = _TOKEN_RE.fullmatch(token)
    if not m:
        raise ValueError(f"not a location token: {token!r} (expected <patch_index_NNNN>)")
    return _check_index(int(m.group(1)))


def location_tokens(ul: int, lr: int) -> str:
    """(288, 990) -> '<patch_index_0288><patch_index_0990>'."""
    check_patch_pair(ul, lr)
    return patch_index_token(ul) + patch_index_token(lr)


def all_location_tokens() -> list[str]:
    """The 1,024 token strings in index order (for tokenizer vocabularies)."""
    return [patch_index_token(i) for i in range(NUM_LOCATION_TOKENS)]
