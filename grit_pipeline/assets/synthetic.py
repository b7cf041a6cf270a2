"""Synthetic img2dataset-format inputs with real images and a matching replay-detections file.

For engine tests and the `bench/` scripts: `write_img2dataset(folder, shards=3, rows_per_shard=40)` writes
`NNNNN.parquet` (img2dataset's metadata columns plus a passthrough `clip_similarity_vitb32`),
`NNNNN.tar` (webdataset members `<key>.jpg/.txt/.json`, JPEGs drawn with PIL) and `NNNNN_stats.json`,
plus `detections.parquet` in the replay backend's schema (key, start, end, corners, score).

Captions are built from concrete nouns ("a red dog next to a blue car on the grass") so spaCy finds the
planted chunks; every row gets 1-3 boxes with scores spread over [0.3, 0.95] so that a `select.min_score`
change keeps a different set of pairs. A few rows are bad on purpose (failed download, empty caption,
duplicate key, no detections), so every reject path of a normal run is exercised. Deterministic per seed.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ADJECTIVES = ("red", "blue", "green", "small", "large", "wooden", "white", "black", "striped", "yellow")
NOUNS = ("dog", "cat", "car", "bicycle", "chair", "table", "horse", "boat", "lamp", "bird", "truck", "tree")
PLACES = ("the grass", "the beach", "a street", "the floor", "a field", "the snow")
RELATIONS = ("next to", "behind", "in front of", "near")


@dataclass(frozen=True)
class SyntheticInput:
    root: Path
    detections: Path
    rows: int  # metadata rows written, bad ones included
    shards: int  # all of them, failed ones included


def _caption(rng: random.Random) -> tuple[str, list[tuple[int, int]]]:
    a1, a2 = rng.choice(ADJECTIVES), rng.choice(ADJECTIVES)
    n1, n2 = rng.sample(NOUNS, 2)
    first, second = f"a {a1} {n1}", f"a {a2} {n2}"
    place = rng.choice(PLACES)
    caption = f"{first} {rng.choice(RELATIONS)} {second} on {place}"
    spans = [(0, len(first))]
    s2 = caption.index(second, len(first))
    spans.append((s2, s2 + len(second)))
    s3 = caption.rindex(place)
    spans.append((s3, s3 + len(place)))
    return caption, spans


def _jpeg(rng: random.Random, width: int, height: int) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x1, y1 = rng.randrange(width - 8), rng.randrange(height - 8)
        x2, y2 = rng.randrange(x1 + 4, width), rng.randrange(y1 + 4, height)
        draw.rectangle([x1, y1, x2, y2], fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def write_img2dataset(folder: str | Path, *, shards: int = 3, rows_per_shard: int = 40, seed: int = 0,
                      bad_rows: bool = True, failed_shards: int = 0, distinct_images: int = 16,
                      image_size: tuple[int, int] = (64, 48)) -> SyntheticInput:
    """Write a synthetic img2dataset output folder and `detections.parquet` next to its shards.

    `failed_shards` more shards follow whose 5 rows all failed to download (an empty ingest output)."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    width, height = image_size
    images = [_jpeg(rng, width, height) for _ in range(distinct_images)]
    det: dict[str, list] = {k: [] for k in ("key", "start", "end", "x1", "y1", "x2", "y2", "score")}
    total = 0
    for shard in range(shards + failed_shards):
        failed = shard >= shards
        meta: dict[str, list] = {k: [] for k in ("key", "url", "caption", "status", "error_message", "width",
                                                  "height", "clip_similarity_vitb32")}
        tar_path = root / f"{shard:05d}.tar"
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(5 if failed else rows_per_shard):
                key = f"{shard:05d}{i:04d}"
                caption, spans = _caption(rng)
                status, error = ("failed_to_download", "timeout") if failed else ("success", None)
                if bad_rows and i == 1:
                    status, error = "failed_to_download", "HTTP 404"
                if bad_rows and i == 2:
                    caption = "   "
                if bad_rows and i == 4:
                    key = f"{shard:05d}{3:04d}"  # duplicate of the row before
                meta["key"].append(key)
                meta["url"].append(f"http://127.0.0.1/img/{shard}/{i}.jpg")
                meta["caption"].append(caption)
                meta["status"].append(status)
                meta["error_message"].append(error)
                meta["width"].append(width if status == "success" else None)
                meta["height"].append(height if status == "success" else None)
                meta["clip_similarity_vitb32"].append(round(0.2 + 0.2 * rng.random(), 4))
                if status == "success" and not (bad_rows and i == 4):
                    _add_member(tar, f"{key}.jpg", images[(shard * rows_per_shard + i) % len(images)])
                    _add_member(tar, f"{key}.txt", caption.encode())
                    _add_member(tar, f"{key}.json", json.dumps({"key": key, "caption": caption}).encode())
                if bad_rows and i == 5:
                    continue  # no detections for this key: rejected by detect
                for start, end in rng.sample(spans, rng.randint(1, len(spans))):
                    x1, y1 = rng.uniform(0.0, 0.6), rng.uniform(0.0, 0.6)
                    det["key"].append(key)
                    det["start"].append(start)
                    det["end"].append(end)
                    det["x1"].append(round(x1, 4))
                    det["y1"].append(round(y1, 4))
                    det["x2"].append(round(x1 + rng.uniform(0.1, 0.39), 4))
                    det["y2"].append(round(y1 + rng.uniform(0.1, 0.39), 4))
                    det["score"].append(round(rng.uniform(0.3, 0.95), 3))
        pq.write_table(pa.table({
            "key": pa.array(meta["key"], pa.string()),
            "url": pa.array(meta["url"], pa.string()),
            "caption": pa.array(meta["caption"], pa.string()),
            "status": pa.array(meta["status"], pa.string()),
            "error_message": pa.array(meta["error_message"], pa.string()),
            "width": pa.array(meta["width"], pa.int64()),
            "height": pa.array(meta["height"], pa.int64()),
            "clip_similarity_vitb32": pa.array(meta["clip_similarity_vitb32"], pa.float64()),
        }), root / f"{shard:05d}.parquet")
        (root / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(meta["key"])}))
        total += len(meta["key"])
    detections = root.parent / f"{root.name}-detections.parquet"
    pq.write_table(pa.table({
        "key": pa.array(det["key"], pa.string()),
        "start": pa.array(det["start"], pa.int32()),
        "end": pa.array(det["end"], pa.int32()),
        "x1": pa.array(det["x1"], pa.float64()),
        "y1": pa.array(det["y1"], pa.float64()),
        "x2": pa.array(det["x2"], pa.float64()),
        "y2": pa.array(det["y2"], pa.float64()),
        "score": pa.array(det["score"], pa.float32()),
    }), detections)
    return SyntheticInput(root=root, detections=detections, rows=total, shards=shards + failed_shards)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def replay_overrides(detections: str | Path) -> list[str]:
    """Config overrides that run detect from the replay file on CPU."""
    return ["detect.backend=replay", f"detect.replay_path={detections}"]
