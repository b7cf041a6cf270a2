"""Build the bundled demo sample from scikit-image's photos and the hand annotations in `demo/annotations.yaml`.

Writes, next to the annotations:

- `demo/shards/`: an img2dataset output folder (what `grit download` writes and `ingest` reads): per shard
  `NNNNN.tar` (webdataset members `<key>.jpg`, `<key>.txt`, `<key>.json`), `NNNNN.parquet` (metadata with
  `status`, `error_message`, sizes, `sha256`, and the passthrough columns `scene`, `license`) and
  `NNNNN_stats.json`. Keys follow img2dataset's scheme (shard * 10,000 + row), two shards.
- `demo/detections.parquet`: the replay detections of the annotated phrases (schema of
  `stages/detectors/replay.py`: key, x1..y2, score, and the chunk's char span start/end).

The photos ship inside scikit-image (no download); they are re-encoded as JPEG (quality 85) so the sample
stays well under 2 MB. Outputs are deterministic (fixed tar metadata, rows in key order): rebuilding gives
the committed bytes. Regenerate after editing the annotations with

    .venv/bin/python grit_pipeline/assets/build_demo_sample.py [--preview DIR]

`--preview` also draws every annotated box on its photo (PNG per row), to check the boxes by eye.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image, ImageDraw

from stages.detectors.replay import REPLAY_SCHEMA

DEMO_DIR = Path(__file__).resolve().parent / "demo"
ANNOTATIONS = DEMO_DIR / "annotations.yaml"
SHARDS_DIR = "shards"
DETECTIONS = "detections.parquet"
JPEG_QUALITY = 85
ROWS_PER_SHARD_SCHEME = 10_000  # img2dataset's default: key = shard * 10**4 + row, 9 digits

# img2dataset's metadata columns (webdataset writer), after the passthrough columns.
METADATA_SCHEMA = pa.schema([
    pa.field("scene", pa.string()),
    pa.field("license", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("url", pa.string()),
    pa.field("key", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("original_width", pa.int32()),
    pa.field("original_height", pa.int32()),
    pa.field("exif", pa.string()),
    pa.field("sha256", pa.string()),
])
# The replay file columns we fill: chunks are given by char span, boxes by identical corners.
DETECTIONS_SCHEMA = pa.schema([REPLAY_SCHEMA.field(name)
                               for name in ("key", "x1", "y1", "x2", "y2", "score", "start", "end")])


@dataclass(frozen=True)
class DemoRow:
    """One row of the sample as annotated: caption, image and the replay entries."""

    key: str
    shard: int
    scene: str
    image: str | None  # skimage.data function name, None when the download failed
    url: str
    license: str | None
    caption: str
    status: str
    error_message: str | None
    phrases: tuple[dict[str, Any], ...]
    distractors: tuple[dict[str, Any], ...]
    expect_reject: dict[str, str] | None


def load_annotations(path: Path = ANNOTATIONS) -> list[DemoRow]:
    """The annotated rows in file order, with their img2dataset keys and shards."""
    doc = yaml.safe_load(path.read_text())
    shard_rows = int(doc["defaults"]["shard_rows"])
    rows: list[DemoRow] = []
    for scene, spec in doc["scenes"].items():
        for row in spec["rows"]:
            i = len(rows)
            shard, index = (0, i) if i < shard_rows else (1, i - shard_rows)
            rows.append(DemoRow(
                key=f"{shard * ROWS_PER_SHARD_SCHEME + index:09d}",
                shard=shard,
                scene=scene,
                image=spec["image"],
                url=spec["url"],
                license=spec.get("license"),
                caption=row["caption"],
                status=row.get("status", "success"),
                error_message=row.get("error_message"),
                phrases=tuple(row.get("phrases", ())),
                distractors=tuple(row.get("distractors", ())),
                expect_reject=row.get("expect_reject"),
            ))
    return rows


def phrase_span(caption: str, text: str) -> tuple[int, int]:
    """Character span of the first whole-word occurrence of `text` in `caption`."""
    m = re.search(rf"(?<!\w){re.escape(text)}(?!\w)", caption)
    if m is None:
        raise ValueError(f"phrase {text!r} not in caption {caption!r}")
    return m.start(), m.end()


def replay_entries(row: DemoRow) -> Iterator[dict[str, Any]]:
    """Replay rows of one demo row: every annotated box and every distractor."""
    for phrase in row.phrases:
        start, end = phrase_span(row.caption, phrase["text"])
        for box in phrase["boxes"]:
            yield _entry(row.key, box, phrase["score"], start, end)
    for extra in row.distractors:
        start, end = phrase_span(row.caption, extra["text"])
        yield _entry(row.key, extra["box"], extra["score"], start, end)


def _entry(key: str, box: list[float], score: float, start: int, end: int) -> dict[str, Any]:
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0):
        raise ValueError(f"{key}: bad box {box}")
    return dict(key=key, x1=x1, y1=y1, x2=x2, y2=y2, score=float(score), start=start, end=end)


def load_photo(name: str) -> Image.Image:
    import skimage.data

    pixels = getattr(skimage.data, name)()
    if isinstance(pixels, tuple):  # stereo_motorcycle: (left, right, disparity)
        pixels = pixels[0]
    return Image.fromarray(np.asarray(pixels))


def encode_jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def build(out_dir: Path = DEMO_DIR, annotations: Path = ANNOTATIONS, preview: Path | None = None) -> list[Path]:
    """Write the sample shards and the replay detections under `out_dir`; returns the files written."""
    rows = load_annotations(annotations)
    photos: dict[str, bytes] = {}
    shards_dir = out_dir / SHARDS_DIR
    shards_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    for shard in sorted({r.shard for r in rows}):
        metadata: list[dict[str, Any]] = []
        tar_path = shards_dir / f"{shard:05d}.tar"
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for row in (r for r in rows if r.shard == shard):
                meta: dict[str, Any] = dict(
                    scene=row.scene, license=row.license, caption=row.caption, url=row.url, key=row.key,
                    status=row.status, error_message=row.error_message, width=None, height=None,
                    original_width=None, original_height=None, exif=None, sha256=None)
                if row.status == "success":
                    if row.image not in photos:
                        photos[row.image] = encode_jpeg(load_photo(row.image))
                    jpeg = photos[row.image]
                    w, h = Image.open(io.BytesIO(jpeg)).size
                    meta.update(width=w, height=h, original_width=w, original_height=h, exif="{}",
                                sha256=hashlib.sha256(jpeg).hexdigest())
                    _tar_add(tar, f"{row.key}.jpg", jpeg)
                    _tar_add(tar, f"{row.key}.txt", row.caption.encode())
                    _tar_add(tar, f"{row.key}.json", json.dumps(meta, indent=4).encode())
                metadata.append(meta)
        pq_path = shards_dir / f"{shard:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(metadata, schema=METADATA_SCHEMA), pq_path)
        ok = sum(m["status"] == "success" for m in metadata)
        stats = {"count": len(metadata), "successes": ok, "failed_to_download": len(metadata) - ok,
                 "failed_to_resize": 0, "status_dict": {"success": ok, **(
                     {m["error_message"]: 1 for m in metadata if m["status"] != "success"})}}
        stats_path = shards_dir / f"{shard:05d}_stats.json"
        stats_path.write_text(json.dumps(stats, indent=4, sort_keys=True) + "\n")
        written += [tar_path, pq_path, stats_path]

    entries = [e for row in rows for e in replay_entries(row)]
    entries.sort(key=lambda e: (e["key"], e["start"], e["end"], -e["score"], e["x1"], e["y1"]))
    det_path = out_dir / DETECTIONS
    pq.write_table(pa.Table.from_pylist(entries, schema=DETECTIONS_SCHEMA), det_path)
    written.append(det_path)

    if preview is not None:
        write_previews(rows, photos, preview)
    return written


def write_previews(rows: list[DemoRow], photos: dict[str, bytes], folder: Path) -> None:
    """Every annotated (green) and distractor (red) box drawn on its photo, one PNG per row."""
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        if row.image is None or not (row.phrases or row.distractors):
            continue
        im = Image.open(io.BytesIO(photos[row.image])).convert("RGB")
        draw = ImageDraw.Draw(im)
        w, h = im.size
        boxes = [(b, p["text"], (0, 255, 0)) for p in row.phrases for b in p["boxes"]]
        boxes += [(d["box"], d["text"], (255, 0, 0)) for d in row.distractors]
        for (x1, y1, x2, y2), label, colour in boxes:
            draw.rectangle([x1 * w, y1 * h, x2 * w, y2 * h], outline=colour, width=2)
            draw.text((x1 * w + 3, y1 * h + 3), label, fill=colour)
        im.save(folder / f"{row.key}-{row.scene}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="folder to write (default: next to this file)")
    parser.add_argument("--preview", type=Path, default=None, help="also draw the boxes into this folder")
    args = parser.parse_args()
    for path in build(args.out, preview=args.preview):
        print(f"{path}  {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
