"""A synthetic GRIT-20M release and a replay detector of known calibration, for `grit calibrate`'s tests
and `bench/score_rules.py`.

The rule, deterministic per seed. Each row's caption, "a red dog next to a blue car on the grass", has
three noun chunks (the vocabulary of `grit_pipeline.assets.synthetic`, which spaCy parses into exactly
those chunks). Each chunk has an object box (in its own cell of a 3 x 3 grid over the image, so boxes of
different chunks never overlap) and a "GLIP" score s ~ U(0.30, 0.98). The release keeps the chunks with
s > `GLIP_THRESHOLD` (0.65) as `noun_chunks` `[start, end, x1, y1, x2, y2, s]`; a row keeping none is
not released (as in GRIT-20M), so only rows with at least one are written.

The replay detector ("ours"): every chunk at its object box moved by at most 1% of the image (IoU > 0.9
with the released box) scored `mapped(s)`, a known monotone map (default: s ** 2, so the paper's 0.65
becomes 0.4225); plus 0-2 distractor boxes per row in cells no chunk uses, each for a random chunk,
scored mapped(u) with u ~ U(0.20, 0.65): every pair the release does not hold scores below mapped(0.65).
A perfect calibration therefore finds min_score = mapped(0.65).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from grit_pipeline.assets.synthetic import ADJECTIVES, NOUNS, PLACES, RELATIONS

GLIP_THRESHOLD = 0.65


def squared(s: float) -> float:
    return s * s


@dataclass
class CalibrationFixture:
    release: Path  # GRIT-20M-style JSON Lines
    replay: Path  # replay-detector Parquet (key, start, end, corners, score)
    mapped_threshold: float  # mapped(0.65): what a calibration should recover
    rows: int
    released_pairs: int
    spans: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # every chunk of each row


def _caption(rng: random.Random) -> tuple[str, list[tuple[int, int]]]:
    first = f"a {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    second = f"a {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    place = rng.choice(PLACES)
    caption = f"{first} {rng.choice(RELATIONS)} {second} on {place}"
    s2 = caption.index(second, len(first))
    s3 = caption.rindex(place)
    return caption, [(0, len(first)), (s2, s2 + len(second)), (s3, s3 + len(place))]


def _box_in(cell: int, rng: random.Random) -> tuple[float, float, float, float]:
    """A box inside one cell of the 3 x 3 grid (normalized xyxy), at least a third of the cell wide."""
    cx, cy = cell % 3, cell // 3
    w, h = rng.uniform(0.12, 0.3), rng.uniform(0.12, 0.3)
    x1 = cx / 3 + rng.uniform(0.01, 1 / 3 - w - 0.01)
    y1 = cy / 3 + rng.uniform(0.01, 1 / 3 - h - 0.01)
    return x1, y1, x1 + w, y1 + h


def write_calibration_fixture(folder: str | Path, rows: int = 400, seed: int = 0,
                              mapped: Callable[[float], float] = squared) -> CalibrationFixture:
    """Write `release.jsonl` and `replay.parquet` under `folder` (module docstring)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    release_lines: list[str] = []
    replay: dict[str, list] = {k: [] for k in ("key", "start", "end", "x1", "y1", "x2", "y2", "score")}
    fixture = CalibrationFixture(folder / "release.jsonl", folder / "replay.parquet",
                                 mapped(GLIP_THRESHOLD), 0, 0)
    index = 0
    while fixture.rows < rows:
        index += 1
        caption, spans = _caption(rng)
        cells = rng.sample(range(9), 5)  # three objects, two cells for distractors
        glip = [rng.uniform(0.30, 0.98) for _ in spans]
        boxes = [_box_in(c, rng) for c in cells[:3]]
        released = [[s, e, *box, score] for (s, e), box, score in zip(spans, boxes, glip, strict=True)
                    if score > GLIP_THRESHOLD]
        if not released:
            continue  # GRIT-20M holds only captions with at least one grounded chunk
        key = f"{index:09d}"
        release_lines.append(json.dumps({
            "key": key, "url": f"https://example.com/grit/{key}.jpg", "caption": caption,
            "width": 640, "height": 480, "noun_chunks": released, "ref_exps": released,
            "id": 10_000_000 + index, "clip_similarity_vitb32": 0.3}))
        fixture.rows += 1
        fixture.released_pairs += len(released)
        fixture.spans[key] = spans

        entries = []
        for span, box, score in zip(spans, boxes, glip, strict=True):
            dx, dy = rng.uniform(-0.003, 0.003), rng.uniform(-0.003, 0.003)
            entries.append((span, (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy), mapped(score)))
        for cell in cells[3:3 + rng.randint(0, 2)]:
            entries.append((rng.choice(spans), _box_in(cell, rng), mapped(rng.uniform(0.20, GLIP_THRESHOLD))))
        for span, box, score in entries:
            for name, value in zip(("key", "start", "end", "x1", "y1", "x2", "y2", "score"),
                                   (key, *span, *box, score), strict=True):
                replay[name].append(value)
    fixture.release.write_text("\n".join(release_lines) + "\n")
    table = pa.table({
        "key": pa.array(replay["key"], pa.string()),
        "start": pa.array(replay["start"], pa.int32()), "end": pa.array(replay["end"], pa.int32()),
        **{c: pa.array(replay[c], pa.float64()) for c in ("x1", "y1", "x2", "y2")},
        "score": pa.array(replay["score"], pa.float32()),
    })
    pq.write_table(table, fixture.replay)
    return fixture
