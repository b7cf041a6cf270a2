"""A small run directory written file by file in DESIGN.md's layout, for the fast report/inspect tests.

Real Parquet files with the stage schemas committed through the engine's RunDir, real synthetic images (a
coloured rectangle where each chunk's true box is), hand-made chunks and detector candidates around those
boxes, then the real SelectStage and ComposeStage. The engine-driven tests (marked `ray`) cover the real run.
No tests in this module; `test_report.py` and `test_inspect.py` import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml
from PIL import Image, ImageDraw

from grit_pipeline.engine.stats import shard_stats
from grit_pipeline.rundir.store import RunDir, ShardFiles
from schemas.tables import (
    CHUNKS_SCHEMA,
    DETECT_SCHEMA,
    INGEST_SCHEMA,
    REJECT_SCHEMA,
)
from stages.compose import ComposeStage
from stages.select import SelectConfig, SelectStage

# caption, chunks as (start, end, expr_start, expr_end), true boxes (normalized xyxy) per chunk
CAPTIONS = [
    ("a dog in a field of flowers", [(0, 5, 0, 27), (9, 16, 9, 27), (20, 27, 20, 27)],
     [(0.10, 0.30, 0.45, 0.80), (0.0, 0.0, 1.0, 1.0), (0.55, 0.60, 0.95, 0.95)]),
    ("a red car next to a tree", [(0, 9, 0, 9), (18, 24, 18, 24)],
     [(0.05, 0.50, 0.55, 0.90), (0.60, 0.05, 0.95, 0.85)]),
    ("two cats & a \"sofa\" [1]", [(0, 8, 0, 8), (11, 19, 11, 19)],
     [(0.20, 0.20, 0.60, 0.60), (0.00, 0.40, 1.00, 1.00)]),
    ("a man riding a horse on the beach", [(0, 5, 0, 20), (13, 20, 13, 20), (24, 33, 24, 33)],
     [(0.30, 0.05, 0.60, 0.60), (0.20, 0.30, 0.80, 0.95), (0.0, 0.70, 1.0, 1.0)]),
]
COLORS = [(200, 60, 60), (60, 160, 60), (60, 90, 200)]
MIN_SCORE = 0.65
NMS_IOU = 0.5
FINGERPRINTS = {"ingest": "f0000000000000a1", "chunks": "f0000000000000b2", "detect": "f0000000000000c3",
                "select": "f0000000000000d4", "compose": "f0000000000000e5"}


@dataclass
class FixtureRun:
    root: Path
    keys_by_shard: dict[int, list[str]] = field(default_factory=dict)
    boxes: dict[str, list[tuple[float, float, float, float]]] = field(default_factory=dict)  # final boxes


def _commit(root: Path, stage: str, shard: int, out: pa.Table, rejects: pa.Table, rows_in: int) -> None:
    """Commit through the engine's own RunDir (atomic files, stats.json, `_done` marker last)."""
    fp = FINGERPRINTS[stage]
    st = shard_stats(stage, shard, fp, rows_in, out, rejects, seconds=0.25 + shard, peak_rss_mb=100.0 + shard)
    RunDir(str(root)).commit_shard(stage, fp, shard, ShardFiles(out, rejects, st.to_json()))


def _rejects(stage: str, rows: list[tuple[str, str, str]]) -> pa.Table:
    return pa.table({"key": [r[0] for r in rows], "stage": [stage] * len(rows), "reason": [r[1] for r in rows],
                     "detail": [r[2] for r in rows]}, schema=REJECT_SCHEMA)


def make_image(path: Path, size: tuple[int, int], boxes) -> None:
    img = Image.new("RGB", size, (235, 235, 225))
    draw = ImageDraw.Draw(img)
    w, h = size
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        if (x2 - x1) * (y2 - y1) > 0.9:  # whole-image box: a background, not a block
            continue
        draw.rectangle([x1 * w, y1 * h, x2 * w - 1, y2 * h - 1], fill=COLORS[i % len(COLORS)])
    img.save(path, quality=90)


def write_fixture_run(root: Path, shards: int = 2, rows_per_shard: int = 8, seed: int = 0) -> FixtureRun:
    """A run of `shards` x `rows_per_shard` rows. Per shard: one row with a `<script>` caption (rejected by
    chunks as unsafe), one with a missing image (rejected by detect), one whose candidates are all weak
    (rejected by select with no_box), one whose best score is ~0.77 (kept at 0.65, not at 0.8); the rest
    reach the final shards."""
    rng = np.random.default_rng(seed)
    run = FixtureRun(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "run.yaml").write_text(yaml.safe_dump({
        "ingest": {"rows_per_shard": rows_per_shard}, "chunks": {}, "detect": {"backend": "replay"},
        "select": {"min_score": MIN_SCORE, "nms_iou": NMS_IOU, "max_box_area": None},
        "compose": {"containment_filter": True, "location_encoder": "unilm"},
        "run": {"input": str(root / "images")}, "fingerprints": FINGERPRINTS}, sort_keys=False))
    compose = ComposeStage()
    for shard in range(shards):
        keys = [f"{shard:05d}{i:04d}" for i in range(rows_per_shard)]
        run.keys_by_shard[shard] = keys
        ingest_rows, chunk_rows, chunk_rejects = [], [], []
        for i, key in enumerate(keys):
            caption, chunks, boxes = CAPTIONS[(i + shard) % len(CAPTIONS)]
            size = (320 + 40 * (i % 3), 240 + 20 * (i % 2))
            image = root / "images" / f"{key}.jpg"
            if i == 2:
                caption = "<script>alert('x')</script> a cat"
            if i == 3:
                image = root / "images" / f"{key}-missing.jpg"
            else:
                make_image(image, size, boxes)
            ingest_rows.append({"key": key, "shard": shard, "url": f"http://example.com/{key}.jpg",
                                "caption": caption, "width": size[0], "height": size[1], "image_ref": str(image)})
            if i == 2:
                chunk_rejects.append((key, "unsafe_caption", "tag-like text '<script>' at char 0"))
            else:
                chunk_rows.append({"key": key, "chunks": [
                    {"start": s, "end": e, "root_start": s, "root_end": e, "expr_start": es, "expr_end": ee,
                     "has_conj": False} for s, e, es, ee in chunks]})
        ingest = pa.Table.from_pylist(ingest_rows, schema=INGEST_SCHEMA)
        _commit(root, "ingest", shard, ingest, _rejects("ingest", []), len(ingest_rows))
        _commit(root, "chunks", shard, pa.Table.from_pylist(chunk_rows, schema=CHUNKS_SCHEMA),
                _rejects("chunks", chunk_rejects), len(ingest_rows))

        by_key = {r["key"]: r for r in ingest_rows}
        detect_rows, detect_rejects = [], []
        for r in chunk_rows:
            i = keys.index(r["key"])
            if i == 3:
                detect_rejects.append((r["key"], "image_unreadable", f"{by_key[r['key']]['image_ref']}: not found"))
                continue
            _, _, true_boxes = CAPTIONS[(i + shard) % len(CAPTIONS)]
            scale = {4: 0.5, 5: 0.85}.get(i, 1.0)  # row 4: nothing above 0.65; row 5: best ~0.77
            cands, box_id = [], 0
            for c, (x1, y1, x2, y2) in enumerate(true_boxes):
                for jitter, score in ((0.0, 0.9 - 0.05 * c), (0.03, 0.75 - 0.05 * c), (0.2, 0.3)):
                    dx, dy = rng.uniform(-jitter, jitter, 2)
                    box = (float(np.clip(x1 + dx, 0, 1)), float(np.clip(y1 + dy, 0, 1)),
                           float(np.clip(x2 + dx, 0, 1)), float(np.clip(y2 + dy, 0, 1)))
                    s = float(np.float32(score * scale + rng.uniform(-0.02, 0.02)))
                    cands.append({"box": box_id, "chunk": c, "x1": box[0], "y1": box[1], "x2": box[2],
                                  "y2": box[3], "score": s, "box_score": s})
                    box_id += 1
            detect_rows.append({"key": r["key"], "candidates": cands})
        detect = pa.Table.from_pylist(detect_rows, schema=DETECT_SCHEMA)
        _commit(root, "detect", shard, detect, _rejects("detect", detect_rejects), len(chunk_rows))

        chunks_by_key = {r["key"]: r["chunks"] for r in chunk_rows}
        select_in = detect.append_column("chunks", pa.array([chunks_by_key[k] for k in detect["key"].to_pylist()],
                                                            CHUNKS_SCHEMA.field("chunks").type))
        selected = SelectStage(SelectConfig(min_score=MIN_SCORE, nms_iou=NMS_IOU)).process_batch(select_in)
        select = selected.output
        _commit(root, "select", shard, select, selected.rejects, detect.num_rows)
        select_rows = select.to_pylist()

        compose_in = pa.Table.from_pylist(
            [{**by_key[r["key"]], "chunks": chunks_by_key[r["key"]], "pairs": r["pairs"]} for r in select_rows])
        result = compose.process_batch(compose_in)
        _commit(root, "compose", shard, result.output, result.rejects, select.num_rows)
        for row in result.output.to_pylist():
            run.boxes[row["key"]] = [tuple(e[2:6]) for e in row["noun_chunks"]]
    return run


def write_one_row_run(root: Path, size: tuple[int, int], background: tuple[int, int, int], caption: str,
                      chunks: list[tuple[int, int]], boxes: list[tuple[float, float, float, float]],
                      key: str = "000000000") -> Path:
    """A one-row, one-shard run whose image is a flat PNG and whose detector found exactly `boxes` (one
    per chunk, scores 0.9, 0.85, ...), all kept by select and compose. Returns the image path."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    image = root / "images" / f"{key}.png"
    Image.new("RGB", size, background).save(image)
    (root / "run.yaml").write_text(yaml.safe_dump({
        "select": {"min_score": MIN_SCORE, "nms_iou": NMS_IOU}, "run": {"input": str(root / "images")},
        "fingerprints": FINGERPRINTS}))
    ingest = pa.Table.from_pylist([{"key": key, "shard": 0, "url": None, "caption": caption, "width": size[0],
                                    "height": size[1], "image_ref": str(image)}], schema=INGEST_SCHEMA)
    chunk_list = [{"start": s, "end": e, "root_start": s, "root_end": e, "expr_start": s, "expr_end": e,
                   "has_conj": False} for s, e in chunks]
    chunk_table = pa.Table.from_pylist([{"key": key, "chunks": chunk_list}], schema=CHUNKS_SCHEMA)
    cands = [{"box": i, "chunk": i, "x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3], "score": 0.9 - 0.05 * i,
              "box_score": 0.9 - 0.05 * i} for i, b in enumerate(boxes)]
    detect = pa.Table.from_pylist([{"key": key, "candidates": cands}], schema=DETECT_SCHEMA)
    selected = SelectStage(SelectConfig(min_score=MIN_SCORE, nms_iou=NMS_IOU)).process_batch(
        detect.append_column("chunks", chunk_table["chunks"]))
    assert selected.output.num_rows == 1 and len(selected.output["pairs"][0]) == len(boxes)
    composed = ComposeStage().process_batch(pa.Table.from_pylist(
        [{**ingest.to_pylist()[0], "chunks": chunk_list, "pairs": selected.output.to_pylist()[0]["pairs"]}]))
    assert composed.output.num_rows == 1
    for stage, out in (("ingest", ingest), ("chunks", chunk_table), ("detect", detect),
                       ("select", selected.output), ("compose", composed.output)):
        _commit(root, stage, 0, out, _rejects(stage, []), 1)
    return image
