"""The one validity check of normalized boxes, used wherever boxes enter or leave a stage.

Boxes are normalized xyxy corners in [0, 1] of the original image. Every checker of the pipeline calls
`check_boxes`: the replay detector (`stages.detectors.replay`), `select` (candidates), `compose` (pairs), the
row model `schemas.rows.SpanBox` and through it `grit validate`. One tolerance for all of them,
`BOX_TOLERANCE`: a corner at most that far outside [0, 1] is float noise of a detector's coordinate
transform and is clipped into [0, 1]; farther is an error. There is no per-stage setting, so a box that one
stage accepts is never refused by the next one.

Problems, in the order they are reported (a box can have several; `BoxCheck.describe` names them in order):
  non_finite          a corner is NaN or infinite
  box_out_of_range    a corner is farther than BOX_TOLERANCE outside [0, 1]
  box_inverted        after clipping, x1 >= x2 or y1 >= y2 (inverted or empty)
  score_out_of_range  the score (when given) is NaN or outside [0, 1]
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

BOX_TOLERANCE = 1e-6

# problem name -> what a message says about it
BOX_PROBLEMS: dict[str, str] = {
    "non_finite": "non-finite corner",
    "box_out_of_range": "corner outside [0, 1]",
    "box_inverted": "inverted or empty box",
    "score_out_of_range": "score not a number in [0, 1]",
}


@dataclass(frozen=True)
class BoxCheck:
    """The result of `check_boxes` over n boxes."""

    clipped: np.ndarray  # (n, 4) float64 corners clipped into [0, 1] (NaN stays NaN)
    problems: dict[str, np.ndarray]  # BOX_PROBLEMS name -> (n,) bool mask, in BOX_PROBLEMS order

    @cached_property
    def ok(self) -> np.ndarray:
        """(n,) bool: the box has no problem."""
        bad = np.zeros(len(self.clipped), dtype=bool)
        for mask in self.problems.values():
            bad |= mask
        return ~bad

    def describe(self, i: int) -> str:
        """All problems of box `i` in words (empty when it is valid)."""
        return ", ".join(BOX_PROBLEMS[name] for name, mask in self.problems.items() if mask[i])


def check_boxes(xyxy, scores=None) -> BoxCheck:
    """Check n boxes given as an (n, 4) array of normalized x1, y1, x2, y2 (and optionally n scores)."""
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(xyxy).all(axis=1)
        outside = ((xyxy < -BOX_TOLERANCE) | (xyxy > 1.0 + BOX_TOLERANCE)).any(axis=1)
        clipped = np.clip(xyxy, 0.0, 1.0)
        ordered = (clipped[:, 0] < clipped[:, 2]) & (clipped[:, 1] < clipped[:, 3])
        problems = {
            "non_finite": ~finite,
            "box_out_of_range": outside,
            "box_inverted": finite & ~ordered,
        }
        if scores is not None:
            s = np.asarray(scores, dtype=np.float64).reshape(-1)
            problems["score_out_of_range"] = ~((s >= 0.0) & (s <= 1.0))
    return BoxCheck(clipped, problems)
