"""The bad-input corpus of the reliability tests: good rows with every kind of bad input mixed in.

`write_corpus(folder)` writes, deterministically, an img2dataset-format input (`NNNNN.parquet` metadata
with key/url/caption/status/error_message/width/height, `NNNNN.tar` webdataset members `<key>.jpg|png`,
`NNNNN_stats.json`) and a replay-detections Parquet next to it, and returns a `Corpus` whose rows each
record what the pipeline must do with them.

    shard 0  images: truncated / zero-byte / garbage JPEG, a PNG whose header claims 30000x30000, 1x1,
             a tar member missing, and a tar cut short in the middle of its second-to-last member (the
             member cut is unreadable, the one after the cut is missing; every member before the cut
             must stay readable) -- and valid oddities that must be KEPT: CMYK, 16-bit, palette with
             transparency, EXIF-rotated
    shard 1  captions: empty, whitespace, 10,000 characters, `<phrase>`, `<patch_index_0001>`, only control
             characters -- and kept: emoji, right-to-left script, `[x](y)`, C0/C1 control characters (NUL,
             ESC sequences, BEL, an 8-bit CSI: removed by ingest), bidirectional overrides and isolates
             (kept in the data, shown escaped by `grit inspect`)
    shard 2  data: duplicate keys, unsafe or missing keys, a failed download, replayed boxes with NaN,
             inf, negative and inverted corners, a key without replayed boxes -- and kept: a row whose
             replayed boxes are half bad
    shard 3  a metadata Parquet with a wrong schema (caption is a double): the shard fails, naming the file
The replay file also holds boxes for keys that exist nowhere (ignored). Every shard has good rows, which
must all reach the final shards.

What happens to a row depends on the detector. A pixel detector (`hf`, `groundingdino`) decodes the image
in detect's `prepare_batch`, so image problems become detect rejects; the `replay` backend checks each
image there too (`detect.check_images`, on by default for rows with images: same checks, same reasons),
and its replayed-box problems count as well. `CorpusRow.expect` takes the mode: `decode` (a pixel detector
scoring every box: `detect.floor=0`, `select.min_score=0`), `replay`, or `full` (images decoded and boxes
replayed, as the stage-level tests run it); `replay` and `full` now expect the same.
"""

from __future__ import annotations

import io
import json
import random
import struct
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from schemas.rows import RejectReason as R

Mode = Literal["decode", "replay", "full"]
Phase = Literal["source", "image", "replay"]  # when a problem applies: always / image read / boxes replayed
SHARD_FAILED = "shard_failed"  # outcome reason of rows in a shard that fails as a whole (not a reject)
IMAGE_SIZE = (64, 48)
GOOD_BOX = (0.1, 0.15, 0.6, 0.8)

GOOD_CAPTIONS = (
    "a red dog on the green grass",
    "a small cat next to a wooden chair",
    "a white horse in front of a big tree",
    "a blue car near a yellow truck",
    "a black bird on a wooden table",
    "a striped boat on the lake",
)


@dataclass(frozen=True)
class Outcome:
    """Where a row ends: the final shards (stage None) or a reject of `stage` with `reason`."""

    stage: str | None = None
    reason: str | None = None

    @property
    def kept(self) -> bool:
        return self.stage is None

    def __str__(self) -> str:
        return "kept" if self.kept else f"{self.stage}:{self.reason}"


KEPT = Outcome()


@dataclass(frozen=True)
class Problem:
    stage: str
    reason: str
    phase: Phase = "source"


# What ingest makes of the captions with control characters: the final shards hold these.
CLEANED_CAPTIONS = {
    "caption:control_chars": "a red dog on the[31m green grass]0;pwned",
    "caption:c1_controls": "a red dog 2J on the green grass",
}


@dataclass(frozen=True)
class CorpusRow:
    shard: int
    key: str  # as the pipeline names the row (ingest's stand-in `<file>#<row>` for a missing key)
    case: str  # what is odd about it, e.g. "image:truncated_jpeg"; "good" for plain good rows
    caption: str | None
    problems: tuple[Problem, ...] = ()

    @property
    def final_caption(self) -> str | None:
        """The caption as a kept row's final shard holds it (control characters removed by ingest)."""
        return CLEANED_CAPTIONS.get(self.case, self.caption)

    def expect(self, mode: Mode) -> Outcome:
        """The outcome under detector `mode` (module docstring): the first problem that applies."""
        skip = {"decode": "replay", "replay": None, "full": None}[mode]
        for p in self.problems:
            if p.phase != skip:
                return Outcome(p.stage, p.reason)
        return KEPT


@dataclass
class Corpus:
    root: Path  # the img2dataset folder (the pipeline's --input)
    detections: Path  # replay file (detect.replay_path)
    rows: list[CorpusRow]
    bad_shard: int  # the shard whose metadata has a wrong schema
    ghost_keys: list[str] = field(default_factory=list)  # replayed keys that are in no shard

    @property
    def shards(self) -> list[int]:
        return sorted({r.shard for r in self.rows})

    def expected(self, mode: Mode) -> dict[tuple[int, str], Counter]:
        """(shard, key) -> Counter of outcomes (a duplicated key has one outcome per occurrence)."""
        out: dict[tuple[int, str], Counter] = {}
        for r in self.rows:
            out.setdefault((r.shard, r.key), Counter())[r.expect(mode)] += 1
        return out

    def rows_by_case(self) -> dict[str, CorpusRow]:
        return {r.case: r for r in self.rows}


# --- images ----------------------------------------------------------------------------------------------
def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _picture(rng: random.Random, size=IMAGE_SIZE, mode: str = "RGB") -> Image.Image:
    im = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(im)
    for _ in range(3):
        x1, y1 = rng.randrange(size[0] - 8), rng.randrange(size[1] - 8)
        draw.rectangle([x1, y1, rng.randrange(x1 + 4, size[0]), rng.randrange(y1 + 4, size[1])],
                       fill=tuple(rng.randrange(256) for _ in range(3)))
    return im if mode == "RGB" else im.convert(mode)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_header_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A small, well-formed PNG whose IHDR claims `width` x `height` (a decompression-bomb header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def image_cases(rng: random.Random) -> dict[str, tuple[str, bytes | None, Problem | None]]:
    """name -> (tar member extension, bytes or None for no member, problem or None when it must be kept)."""
    good = _encode(_picture(rng), "JPEG", quality=85)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    rgba = _picture(rng).convert("RGBA")
    palette = rgba.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    sixteen = Image.fromarray((np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 21).astype(np.uint16))
    garbage = bytes(rng.randrange(256) for _ in range(2048))
    decode_error = Problem("detect", R.IMAGE_DECODE_ERROR.value, "image")
    return {
        "image:truncated_jpeg": ("jpg", good[: len(good) // 2], decode_error),
        "image:zero_byte_jpeg": ("jpg", b"", decode_error),
        "image:garbage_jpeg": ("jpg", b"\x00GARBAGE" + garbage, decode_error),
        "image:png_header_30000x30000": ("png", huge_header_png(),
                                         Problem("detect", R.IMAGE_TOO_LARGE.value, "image")),
        "image:1x1": ("jpg", _encode(Image.new("RGB", (1, 1), (200, 10, 10)), "JPEG"),
                      Problem("detect", R.IMAGE_TOO_SMALL.value, "image")),
        "image:missing_tar_member": ("jpg", None, Problem("ingest", R.MISSING_IMAGE.value)),
        "image:cmyk_jpeg": ("jpg", _encode(_picture(rng, mode="CMYK"), "JPEG"), None),
        "image:16bit_png": ("png", _encode(sixteen, "PNG"), None),
        "image:palette_transparency_png": ("png", _encode(palette, "PNG"), None),
        "image:exif_rotated_jpeg": ("jpg", _encode(_picture(rng), "JPEG", exif=exif.tobytes()), None),
    }


# --- captions --------------------------------------------------------------------------------------------
def caption_cases() -> dict[str, tuple[str, Problem | None]]:
    unsafe = Problem("chunks", R.UNSAFE_CAPTION.value)
    return {
        "caption:empty": ("", Problem("ingest", R.EMPTY_CAPTION.value)),
        "caption:whitespace": (" \t\n\u00a0 ", Problem("ingest", R.EMPTY_CAPTION.value)),
        "caption:10000_chars": (("a red dog on the grass " * 500)[:10_000],
                                Problem("ingest", R.CAPTION_TOO_LONG.value)),
        "caption:phrase_tag": ("a <phrase>red dog</phrase> on the green grass", unsafe),
        "caption:patch_index_token": ("a red dog <patch_index_0001> on the green grass", unsafe),
        "caption:emoji": ("a brown dog \U0001f436 on the green grass \U0001f33f", None),
        "caption:right_to_left": ("a red dog on the green grass \u05db\u05dc\u05d1 \u05d0\u05d3\u05d5\u05dd "
                                  "\u0639\u0644\u0649 \u0627\u0644\u0639\u0634\u0628", None),
        "caption:markdown_link": ("a red dog next to [x](y) on the green grass", None),
        "caption:control_chars": ("a red dog\x00 on the\x1b[31m green grass\x1b]0;pwned\x07", None),
        "caption:c1_controls": ("a red dog \x9b2J on the green\x85grass\x90", None),
        "caption:bidi_override": ("a red dog on the \u202egreen grass\u202c \u2066next\u2069 to it", None),
        "caption:only_control_chars": ("\x00\x1b\x07\x9b", Problem("ingest", R.EMPTY_CAPTION.value)),
    }


# --- writing ---------------------------------------------------------------------------------------------
@dataclass
class _Shard:
    index: int
    meta: dict[str, list] = field(default_factory=lambda: {k: [] for k in (
        "key", "url", "caption", "status", "error_message", "width", "height")})
    members: list[tuple[str, bytes]] = field(default_factory=list)
    cut_member: str | None = None  # the tar ends in the middle of this member's data

    def add(self, key: str | None, caption: str | None, *, image: tuple[str, bytes | None] | None,
            status: str = "success", error: str | None = None, size=IMAGE_SIZE) -> int:
        row = len(self.meta["key"])
        self.meta["key"].append(key)
        self.meta["url"].append(f"http://127.0.0.1/img/{self.index}/{row}.jpg")
        self.meta["caption"].append(caption)
        self.meta["status"].append(status)
        self.meta["error_message"].append(error)
        self.meta["width"].append(size[0] if status == "success" else None)
        self.meta["height"].append(size[1] if status == "success" else None)
        if image is not None and image[1] is not None and key is not None:
            self.members.append((f"{key}.{image[0]}", image[1]))
        return row

    def write(self, root: Path, caption_type: pa.DataType = pa.string()) -> None:
        name = f"{self.index:05d}"
        captions = self.meta["caption"]
        if pa.types.is_floating(caption_type):  # the wrong-schema shard
            captions = [float(i) for i in range(len(captions))]
        pq.write_table(pa.table({
            "key": pa.array(self.meta["key"], pa.string()),
            "url": pa.array(self.meta["url"], pa.string()),
            "caption": pa.array(captions, caption_type),
            "status": pa.array(self.meta["status"], pa.string()),
            "error_message": pa.array(self.meta["error_message"], pa.string()),
            "width": pa.array(self.meta["width"], pa.int64()),
            "height": pa.array(self.meta["height"], pa.int64()),
        }), root / f"{name}.parquet")
        with tarfile.open(root / f"{name}.tar", "w", format=tarfile.GNU_FORMAT) as tar:
            for member, data in self.members:
                info = tarfile.TarInfo(member)
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
        if self.cut_member is not None:
            with tarfile.open(root / f"{name}.tar") as tar:
                cut = tar.getmember(self.cut_member)
            with open(root / f"{name}.tar", "r+b") as f:
                f.truncate(cut.offset_data + cut.size // 2)
        (root / f"{name}_stats.json").write_text(json.dumps({"count": len(self.meta["key"])}))


class _Detections:
    def __init__(self) -> None:
        self.cols: dict[str, list] = {k: [] for k in ("key", "chunk", "x1", "y1", "x2", "y2", "score")}

    def add(self, key: str, box=GOOD_BOX, score: float = 0.9, chunk: int = 0) -> None:
        for name, value in zip(("key", "chunk", "x1", "y1", "x2", "y2", "score"), (key, chunk, *box, score), strict=True):
            self.cols[name].append(value)

    def write(self, path: Path) -> None:
        c = self.cols
        pq.write_table(pa.table({
            "key": pa.array(c["key"], pa.string()), "chunk": pa.array(c["chunk"], pa.int32()),
            **{k: pa.array(c[k], pa.float64()) for k in ("x1", "y1", "x2", "y2")},
            "score": pa.array(c["score"], pa.float32()),
        }), path)


def write_corpus(folder: str | Path, *, seed: int = 0, good_per_shard: int = 4) -> Corpus:
    """Write the corpus into `folder` (created; its `input/` is the img2dataset folder) and describe it."""
    folder = Path(folder)
    root = folder / "input"
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows: list[CorpusRow] = []
    dets = _Detections()
    shards = [_Shard(i) for i in range(4)]

    def good(shard: _Shard, n: int) -> None:
        for _ in range(n):
            key = f"{shard.index:05d}{len(shard.meta['key']):04d}"
            caption = GOOD_CAPTIONS[(shard.index + len(shard.meta["key"])) % len(GOOD_CAPTIONS)]
            shard.add(key, caption, image=("jpg", _encode(_picture(rng), "JPEG", quality=85)))
            dets.add(key)
            rows.append(CorpusRow(shard.index, key, "good", caption))

    def key_of(shard: _Shard) -> str:
        return f"{shard.index:05d}{len(shard.meta['key']):04d}"

    # shard 0: images
    s = shards[0]
    good(s, good_per_shard // 2)
    for case, (ext, data, problem) in image_cases(rng).items():
        key, caption = key_of(s), GOOD_CAPTIONS[len(rows) % len(GOOD_CAPTIONS)]
        size = (1, 1) if case == "image:1x1" else (30_000, 30_000) if "30000" in case else IMAGE_SIZE
        s.add(key, caption, image=(ext, data), size=size)
        dets.add(key)
        rows.append(CorpusRow(0, key, case, caption, (problem,) if problem else ()))
    good(s, good_per_shard - good_per_shard // 2)
    for case, problem in (("image:tar_cut_short", Problem("detect", R.IMAGE_UNREADABLE.value, "image")),
                          ("image:after_the_tar_cut", Problem("ingest", R.MISSING_IMAGE.value))):
        key, caption = key_of(s), GOOD_CAPTIONS[len(rows) % len(GOOD_CAPTIONS)]
        s.add(key, caption, image=("jpg", _encode(_picture(rng), "JPEG", quality=85)))
        dets.add(key)
        rows.append(CorpusRow(0, key, case, caption, (problem,)))
    s.cut_member = s.members[-2][0]  # the last two rows' members are the last two in the tar

    # shard 1: captions
    s = shards[1]
    good(s, good_per_shard // 2)
    for case, (caption, problem) in caption_cases().items():
        key = key_of(s)
        s.add(key, caption, image=("jpg", _encode(_picture(rng), "JPEG")))
        dets.add(key)
        rows.append(CorpusRow(1, key, case, caption, (problem,) if problem else ()))
    good(s, good_per_shard - good_per_shard // 2)

    # shard 2: data
    s = shards[2]
    good(s, good_per_shard // 2)
    caption = GOOD_CAPTIONS[0]
    picture = ("jpg", _encode(_picture(rng), "JPEG"))
    dup = key_of(s)
    for occurrence in range(2):  # the first occurrence is kept, the second rejected
        s.add(dup, caption, image=picture if occurrence == 0 else None)
        rows.append(CorpusRow(2, dup, f"data:duplicate_key#{occurrence}", caption,
                              (Problem("ingest", R.DUPLICATE_KEY.value),) if occurrence else ()))
    dets.add(dup)
    bad_source = Problem("ingest", R.BAD_SOURCE_ROW.value)
    for case, key in (("data:key_path_traversal", "../../etc/passwd"), ("data:key_with_slash", "a/b"),
                      ("data:key_control_char", "bad\x07key"), ("data:key_empty", ""),
                      ("data:key_300_chars", "k" * 300)):
        s.add(key, caption, image=picture)
        dets.add(key)
        rows.append(CorpusRow(2, key, case, caption, (bad_source,)))
    row = s.add(None, caption, image=picture)
    rows.append(CorpusRow(2, f"00002.parquet#{row}", "data:key_null", caption, (bad_source,)))
    key = key_of(s)
    s.add(key, caption, image=None, status="failed_to_download", error="HTTP 404")
    rows.append(CorpusRow(2, key, "data:download_failed", caption, (Problem("ingest", R.DOWNLOAD_FAILED.value),)))
    bad_detection = Problem("detect", R.BAD_DETECTION.value, "replay")
    nan, inf = float("nan"), float("inf")
    for case, box in (("data:replay_nan_box", (nan, 0.1, 0.5, 0.5)), ("data:replay_inf_box", (0.1, 0.1, 0.5, inf)),
                      ("data:replay_negative_box", (-0.25, -0.5, 0.5, 0.5)),
                      ("data:replay_inverted_box", (0.7, 0.8, 0.2, 0.1))):
        key = key_of(s)
        s.add(key, caption, image=("jpg", _encode(_picture(rng), "JPEG")))
        dets.add(key, box=box)
        rows.append(CorpusRow(2, key, case, caption, (bad_detection,)))
    key = key_of(s)
    s.add(key, caption, image=("jpg", _encode(_picture(rng), "JPEG")))
    dets.add(key, box=(nan, nan, nan, nan), score=nan)
    dets.add(key)  # one usable box: the row is kept, the bad one dropped
    rows.append(CorpusRow(2, key, "data:replay_half_bad_boxes", caption))
    key = key_of(s)
    s.add(key, caption, image=("jpg", _encode(_picture(rng), "JPEG")))
    rows.append(CorpusRow(2, key, "data:replay_no_entry", caption,
                          (Problem("detect", R.NO_DETECTION.value, "replay"),)))
    good(s, good_per_shard - good_per_shard // 2)

    # shard 3: wrong schema; its rows never get an outcome of their own
    s = shards[3]
    good(s, good_per_shard)
    failed = Problem("ingest", SHARD_FAILED)
    rows[-good_per_shard:] = [CorpusRow(r.shard, r.key, "data:wrong_schema_shard", r.caption, (failed,))
                              for r in rows[-good_per_shard:]]

    ghosts = [f"ghost{i:04d}" for i in range(3)]
    for g in ghosts:
        dets.add(g)
    for shard in shards:
        shard.write(root, pa.float64() if shard.index == 3 else pa.string())
    detections = folder / "detections.parquet"
    dets.write(detections)
    corpus = Corpus(root=root, detections=detections, rows=rows, bad_shard=3, ghost_keys=ghosts)
    (folder / "expected.json").write_text(json.dumps(
        [{"shard": r.shard, "key": r.key, "case": r.case, **{m: str(r.expect(m)) for m in ("decode", "replay", "full")}}
         for r in rows], indent=1, ensure_ascii=False))
    return corpus


def outcomes_of(final: pa.Table, rejects: pa.Table) -> dict[tuple[int, str], Counter]:
    """(shard, key) -> Counter of outcomes from final rows (`key`, `shard`) and rejects (`key`, `shard`,
    `stage`, `reason`), the inverse of `Corpus.expected`."""
    out: dict[tuple[int, str], Counter] = {}
    for r in final.select(["shard", "key"]).to_pylist():
        out.setdefault((r["shard"], r["key"]), Counter())[KEPT] += 1
    for r in rejects.select(["shard", "key", "stage", "reason"]).to_pylist():
        out.setdefault((r["shard"], r["key"]), Counter())[Outcome(r["stage"], r["reason"])] += 1
    return out


def mismatches(expected: dict[tuple[int, str], Counter], actual: dict[tuple[int, str], Counter],
               rows: list[CorpusRow]) -> list[str]:
    """Readable differences between expected and actual outcomes, one line per (shard, key)."""
    cases = {}
    for r in rows:
        cases.setdefault((r.shard, r.key), []).append(r.case)
    lines = []
    for k in sorted(set(expected) | set(actual), key=lambda k: (k[0], k[1])):
        e, a = expected.get(k, Counter()), actual.get(k, Counter())
        if e != a:
            lines.append(f"shard {k[0]} key {k[1]!r} ({', '.join(cases.get(k, ['not in corpus']))}): "
                         f"expected {sorted(map(str, e.elements()))}, got {sorted(map(str, a.elements()))}")
    return lines
