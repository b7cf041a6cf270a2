"""Tests of the ingest stage: every source format on small generated fixtures, every reject reason,
deterministic shard splitting, passthrough columns, and a real img2dataset run (slow)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from schemas.tables import INGEST_SCHEMA, REJECT_SCHEMA
from stages.ingest import IngestConfig, IngestStage, SourceSchemaError, SourceShard
from stages.sources import detect_format

GRIT_SAMPLES = Path(__file__).resolve().parent / "data" / "grit_published_samples.jsonl"


# --- helpers ---------------------------------------------------------------------------------------------

def jpeg(color: tuple[int, int, int], size=(16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def ingest(uri: str, **cfg):
    """Run discover -> read -> process_batch over every shard; check the stage contract on each."""
    stage = IngestStage(IngestConfig(**cfg))
    shards = stage.discover(uri)
    outputs, rejects = [], []
    for shard in shards:
        raw = stage.read(shard)
        res = stage.process_batch(raw)
        assert res.output.schema.names[: len(INGEST_SCHEMA)] == INGEST_SCHEMA.names
        assert res.output.select(INGEST_SCHEMA.names).schema == INGEST_SCHEMA
        assert res.rejects.schema == REJECT_SCHEMA
        assert res.output.num_rows + res.rejects.num_rows == raw.num_rows
        assert set(res.output["shard"].to_pylist()) <= {shard.index}
        outputs.append(res.output)
        rejects.append(res.rejects)
    return shards, outputs, rejects


def rows_by_key(tables: list[pa.Table]) -> dict[str, dict]:
    rows = [r for t in tables for r in t.to_pylist()]
    out = {r["key"]: r for r in rows}
    assert len(out) == len(rows), "output keys must be unique"
    return out


def reasons(tables: list[pa.Table]) -> dict[str, tuple[str, str]]:
    return {r["key"]: (r["reason"], r["detail"]) for t in tables for r in t.to_pylist()}


I2D_META = [
    # key, status, error_message, caption, member present in the tar
    ("000000", "success", None, "A dog\n in  a\tfield ", True),
    ("000001", "failed_to_download", "HTTP Error 404: File not found", "gone", False),
    ("000002", "success", None, "no image for me", False),
    ("000003", "success", None, " \n\t ", True),
    ("000004", "success", None, "x" * 2001, True),
    ("000000", "success", None, "the same key again", True),
    ("../up", "success", None, "a key that climbs", False),
    ("000007", "success", None, "a cat", True),
]


def write_i2d_shard(root: Path, number: str, meta: list[tuple], layout: str) -> None:
    """One img2dataset shard as img2dataset 1.47 writes it (metadata Parquet, stats, images)."""
    keys = [m[0] for m in meta]
    table = pa.table({
        "caption": pa.array([m[3] for m in meta], pa.string()),
        "url": pa.array([f"http://example.com/{k}.jpg" for k in keys], pa.string()),
        "key": pa.array(keys, pa.string()),
        "status": pa.array([m[1] for m in meta], pa.string()),
        "error_message": pa.array([m[2] for m in meta], pa.string()),
        "width": pa.array([16 if m[1] == "success" else None for m in meta], pa.int32()),
        "height": pa.array([12 if m[1] == "success" else None for m in meta], pa.int32()),
        "original_width": pa.array([160 if m[1] == "success" else None for m in meta], pa.int32()),
        "original_height": pa.array([120 if m[1] == "success" else None for m in meta], pa.int32()),
        "exif": pa.array(["{}"] * len(meta), pa.string()),
        "sha256": pa.array([hashlib.sha256(k.encode()).hexdigest() for k in keys], pa.string()),
        "similarity": pa.array([0.25 + i / 100 for i in range(len(meta))], pa.float64()),
        "chunks": pa.array([i for i in range(len(meta))], pa.int64()),  # clashes with a produced column
    })
    pq.write_table(table, root / f"{number}.parquet")
    (root / f"{number}_stats.json").write_text(json.dumps({"count": len(meta)}))
    members = {}
    for i, (key, _, _, caption, present) in enumerate(meta):
        if present and "/" not in key:
            members[f"{key}.jpg"] = jpeg((10 * i, 100, 200))
            members[f"{key}.txt"] = caption.encode()
            members[f"{key}.json"] = json.dumps({"key": key}).encode()
    if layout == "webdataset":
        with tarfile.open(root / f"{number}.tar", "w") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        (root / number).mkdir()
        for name, data in members.items():
            (root / number / name).write_bytes(data)


@pytest.fixture
def i2d(tmp_path) -> Path:
    """Two shards, 00000 as webdataset with every kind of bad row, 00003 in the files layout."""
    root = tmp_path / "i2d"
    root.mkdir()
    write_i2d_shard(root, "00000", I2D_META, "webdataset")
    write_i2d_shard(root, "00003", [("000300", "success", None, "a bird", True)], "files")
    return root


# --- img2dataset -----------------------------------------------------------------------------------------

def test_img2dataset_shards_are_numbered_by_file_name(i2d):
    shards = IngestStage().discover(str(i2d))
    assert [(s.index, s.format) for s in shards] == [(0, "img2dataset"), (3, "img2dataset")]
    assert shards[0].images_uri == f"{i2d}/00000.tar"
    assert shards[1].images_uri == f"{i2d}/00003"
    assert shards[0].name == "shard-00000"


def test_img2dataset_every_reject_reason(i2d):
    _, outputs, rejects = ingest(str(i2d))
    why = reasons(rejects)
    assert why["000001"] == ("download_failed", "HTTP Error 404: File not found")
    assert why["000002"][0] == "missing_image"
    assert "000002" in why["000002"][1] and "00000.tar" in why["000002"][1]
    assert why["000003"] == ("empty_caption", "caption is empty or whitespace")
    assert why["000004"][0] == "caption_too_long"
    assert why["../up"][0] == "bad_source_row"
    assert why["000000"][0] == "duplicate_key"  # the second 000000; the first is kept
    out = rows_by_key(outputs)
    assert sorted(out) == ["000000", "000007", "000300"]
    assert out["000000"]["caption"] == "A dog in a field"


def test_img2dataset_image_refs_open_the_right_bytes(i2d):
    _, outputs, _ = ingest(str(i2d))
    out = rows_by_key(outputs)
    tar_ref = out["000007"]["image_ref"]
    assert tar_ref == f"tar://000007.jpg::{i2d}/00000.tar"
    with tarfile.open(i2d / "00000.tar") as tar:
        expected = tar.extractfile("000007.jpg").read()
    with fsspec.open(tar_ref, "rb") as f:
        assert f.read() == expected
    offset, size = out["000007"]["image_offset"], out["000007"]["image_size"]  # where detect reads it
    assert size == len(expected) and (i2d / "00000.tar").read_bytes()[offset:offset + size] == expected
    assert out["000300"]["image_ref"] == f"{i2d}/00003/000300.jpg"
    assert out["000300"]["image_offset"] is None and out["000300"]["image_size"] is None  # a plain file
    with fsspec.open(out["000300"]["image_ref"], "rb") as f:
        assert Image.open(f).size == (out["000300"]["width"], out["000300"]["height"])


def test_img2dataset_passthrough_columns_keep_types_and_clashes_are_renamed(i2d):
    _, outputs, _ = ingest(str(i2d))
    schema = outputs[0].schema
    extra = schema.names[len(INGEST_SCHEMA):]
    assert extra == ["original_width", "original_height", "exif", "sha256", "similarity", "src_chunks"]
    assert schema.field("original_width").type == pa.int32()
    assert schema.field("similarity").type == pa.float64()
    assert schema.field("src_chunks").type == pa.int64()
    assert "status" not in schema.names and "error_message" not in schema.names
    row = rows_by_key(outputs)["000007"]
    assert (row["similarity"], row["src_chunks"], row["original_width"]) == (0.32, 7, 160)


def test_img2dataset_tar_is_listed_once_per_shard(i2d, monkeypatch):
    import stages.sources.base as base

    opened = []
    real_open = tarfile.open

    def counting_open(*args, **kwargs):
        opened.append(1)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(base.tarfile, "open", counting_open)
    stage = IngestStage()
    stage.read(stage.discover(str(i2d))[0])
    assert len(opened) == 1


def test_require_image_false_keeps_rows_without_images(i2d):
    _, outputs, rejects = ingest(str(i2d), require_image=False)
    out = rows_by_key(outputs)
    assert out["000002"]["image_ref"] is None
    assert "000002" not in reasons(rejects)
    assert reasons(rejects)["000001"][0] == "download_failed"  # still: the download failed


def test_img2dataset_shard_without_images_reports_missing_images(tmp_path):
    write_i2d_shard(tmp_path, "00000", [("000000", "success", None, "a dog", True)], "webdataset")
    (tmp_path / "00000.tar").unlink()
    _, _, rejects = ingest(str(tmp_path))
    assert reasons(rejects)["000000"][0] == "missing_image"


def test_missing_caption_column_is_an_error_naming_the_file(tmp_path):
    write_i2d_shard(tmp_path, "00000", [("000000", "success", None, "a dog", True)], "webdataset")
    pq.write_table(pq.read_table(tmp_path / "00000.parquet").drop(["caption"]), tmp_path / "00000.parquet")
    stage = IngestStage()
    with pytest.raises(SourceSchemaError, match=r"00000\.parquet.*caption"):
        stage.read(stage.discover(str(tmp_path))[0])


def test_caption_of_the_wrong_type_is_an_error_naming_the_file(tmp_path):
    write_i2d_shard(tmp_path, "00000", [("000000", "success", None, "a dog", True)], "webdataset")
    t = pq.read_table(tmp_path / "00000.parquet")
    t = t.set_column(t.schema.get_field_index("caption"), "caption", pa.array([[1.0]]))
    pq.write_table(t, tmp_path / "00000.parquet")
    stage = IngestStage()
    with pytest.raises(SourceSchemaError, match=r"00000\.parquet: caption column has type"):
        stage.read(stage.discover(str(tmp_path))[0])


def test_a_file_that_is_not_a_tar_is_an_error_naming_it(tmp_path):
    write_i2d_shard(tmp_path, "00000", [("000000", "success", None, "a dog", True)], "webdataset")
    (tmp_path / "00000.tar").write_bytes(b"")
    stage = IngestStage()
    with pytest.raises(SourceSchemaError, match=r"00000\.tar"):
        stage.read(stage.discover(str(tmp_path))[0])


@pytest.mark.parametrize("key, detail", [
    ("a/b", "holds '/'"), ("a\\b", "holds '/'"), ("a..b", "holds '/'"), ("a\x00b", "holds '/'"),
    ("tab\tkey", "holds '/'"), ("", "key is empty"), ("k" * 257, "257 characters"),
])
def test_unsafe_keys_are_bad_source_rows(tmp_path, key, detail):
    write_i2d_shard(tmp_path, "00000", [(key, "success", None, "a dog", False),
                                        ("000001", "success", None, "a cat", True)], "webdataset")
    _, outputs, rejects = ingest(str(tmp_path))
    assert reasons(rejects)[key][0] == "bad_source_row"
    assert detail in reasons(rejects)[key][1]
    assert list(rows_by_key(outputs)) == ["000001"]  # the neighbour is not lost


def test_integer_keys_become_strings(tmp_path):
    pq.write_table(pa.table({"key": pa.array([7, 8], pa.int64()), "caption": ["a", "b"],
                             "url": ["u1", "u2"], "status": ["success", "success"]}), tmp_path / "00000.parquet")
    (tmp_path / "00000").mkdir()
    for k in ("7", "8"):
        (tmp_path / "00000" / f"{k}.png").write_bytes(jpeg((0, 0, 0)))
    _, outputs, _ = ingest(str(tmp_path))
    assert sorted(rows_by_key(outputs)) == ["7", "8"]
    assert rows_by_key(outputs)["7"]["image_ref"] == f"{tmp_path}/00000/7.png"


def test_fsspec_memory_filesystem_works_like_local(tmp_path):
    write_i2d_shard(tmp_path, "00000", I2D_META, "webdataset")
    mem = fsspec.filesystem("memory")
    for p in tmp_path.iterdir():
        mem.pipe(f"/i2d-test/{p.name}", p.read_bytes())
    try:
        _, outputs, rejects = ingest("memory://i2d-test")
        local = ingest(str(tmp_path))
        assert reasons(rejects) == reasons(local[2])
        out = rows_by_key(outputs)
        assert out["000007"]["image_ref"] == "tar://000007.jpg::memory://i2d-test/00000.tar"
        with fsspec.open(out["000007"]["image_ref"], "rb") as f:
            assert Image.open(f).size == (16, 12)
    finally:
        mem.rm("/i2d-test", recursive=True)


def test_same_input_gives_byte_identical_output(i2d):
    def run_bytes():
        _, outputs, rejects = ingest(str(i2d))
        buf = io.BytesIO()
        for t in outputs + rejects:
            pq.write_table(t, buf)
        return buf.getvalue()

    assert run_bytes() == run_bytes()


# --- caption normalization -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, expected", [
    ("collapse", "two lines and spaces"),
    ("strip", "two\nlines  and\u00a0\u3000spaces"),
    ("keep", " two\nlines  and\u00a0\u3000spaces\u2028"),
])
def test_caption_whitespace_modes(tmp_path, mode, expected):
    caption = " two\nlines  and\u00a0\u3000spaces\u2028"
    write_i2d_shard(tmp_path, "00000", [("000000", "success", None, caption, True)], "webdataset")
    _, outputs, _ = ingest(str(tmp_path), caption_whitespace=mode)
    assert rows_by_key(outputs)["000000"]["caption"] == expected


def _captions_table(captions: list[str | None]) -> pa.Table:
    n = len(captions)
    return pa.table({"key": [f"k{i}" for i in range(n)], "shard": pa.array([0] * n, pa.int32()),
                     "caption": pa.array(captions, pa.string())})


@pytest.mark.parametrize("mode", ["collapse", "strip", "keep"])
def test_control_characters_are_removed_and_whitespace_ones_normalized(mode):
    captions = ["a dog\x00 in a\x1b[31m field", "bell\x07 and delete\x7f and csi\x9b31m",
                "tab\tnel\x85 end", "a plain caption", "\x00\x1b\x07", None]
    res = IngestStage(IngestConfig(caption_whitespace=mode)).process_batch(_captions_table(captions))
    out = {r["key"]: r["caption"] for r in res.output.to_pylist()}
    assert out["k0"] == "a dog in a[31m field"
    assert out["k1"] == "bell and delete and csi31m"
    assert out["k2"] == {"collapse": "tab nel end", "strip": "tab\tnel\x85 end", "keep": "tab\tnel\x85 end"}[mode]
    assert out["k3"] == "a plain caption"
    assert reasons([res.rejects]) == {"k4": ("empty_caption", "caption holds only whitespace and control characters"),
                                      "k5": ("empty_caption", "caption is null")}
    for caption in out.values():
        assert not any(0x00 <= ord(ch) < 0x20 and ch not in "\t\n\v\f\r" or 0x7f <= ord(ch) <= 0x9f and ch != "\x85"
                       for ch in caption)
    assert res.counters == {"control_chars_removed": 2}  # k0 and k1; k4 was rejected, k2 only had whitespace


def test_legitimate_unicode_is_kept_as_it_is():
    captions = ["a brown dog \U0001f436 on the grass \U0001f33f", "caf\u00e9 and cafe\u0301 (combining)",
                "a red dog \u05db\u05dc\u05d1 \u0639\u0644\u0649 \u0627\u0644\u0639\u0634\u0628",
                "a flag \U0001f1fa\U0001f1f8 and a family \U0001f468\u200d\U0001f469\u200d\U0001f467",
                "bidi \u202eoverride\u202c stays: display escapes it"]
    res = IngestStage().process_batch(_captions_table(captions))
    assert res.output["caption"].to_pylist() == captions
    assert res.counters == {"control_chars_removed": 0}


def test_chunks_of_a_caption_with_control_characters_hold_none():
    from stages.chunks import ChunksStage

    res = IngestStage().process_batch(_captions_table(["a dog\x00 in a\x1b[31m field"]))
    caption = res.output["caption"][0].as_py()
    chunks_stage = ChunksStage()
    chunks_stage.setup()
    chunked = chunks_stage.process_batch(res.output.select(["key", "caption"]))
    spans = [caption[c["start"]:c["end"]] for c in chunked.output["chunks"][0].as_py()]
    assert "a dog" in spans and not any("\x1b" in s or "\x00" in s for s in spans)


def test_max_caption_chars_boundary_and_off(tmp_path):
    write_i2d_shard(tmp_path, "00000", [("000000", "success", None, "abcde", True),
                                        ("000001", "success", None, "abcdef", True)], "webdataset")
    _, outputs, rejects = ingest(str(tmp_path), max_caption_chars=5)
    assert list(rows_by_key(outputs)) == ["000000"]
    assert reasons(rejects)["000001"] == ("caption_too_long", "6 characters > max_caption_chars 5")
    _, outputs, _ = ingest(str(tmp_path), max_caption_chars=None)
    assert len(rows_by_key(outputs)) == 2


# --- folder ----------------------------------------------------------------------------------------------

def make_folder(root: Path, kind: str = "jsonl") -> Path:
    root.mkdir()
    (root / "imgs").mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (root / name).write_bytes(jpeg((1, 2, 3)))
    (root / "imgs" / "d.png").write_bytes(jpeg((4, 5, 6)))
    rows = [
        {"file": "a.jpg", "caption": "a red\nball", "source_id": 1},
        {"file": "./imgs/d.png", "caption": "a blue cup", "source_id": 2},
        {"file": "missing.jpg", "caption": "nothing here", "source_id": 3},
        {"file": "../outside.jpg", "caption": "escapes", "source_id": 4},
        {"file": "b.jpg", "caption": "   ", "source_id": 5},
        {"file": "c.jpg", "caption": "a tree", "source_id": 6},
        {"file": "a.jpg", "caption": "a again", "source_id": 7},
    ]
    if kind == "jsonl":
        lines = [json.dumps(r) for r in rows]
        lines.insert(3, "{not json")
        lines.insert(5, "")  # blank lines are not records
        lines.append(json.dumps({"file": "c.jpg", "caption": 42}))
        (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    else:
        with open(root / "captions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file", "caption", "source_id"])
            for r in rows:
                w.writerow([r["file"], r["caption"], r["source_id"]])
            w.writerow(["c.jpg", "too", "many", "fields"])
    return root


def path_key(rel: str) -> str:
    return hashlib.sha256(rel.encode()).hexdigest()[:20]


def test_folder_jsonl_rows_and_rejects(tmp_path):
    root = make_folder(tmp_path / "f")
    assert detect_format(str(root)) == "folder"
    shards, outputs, rejects = ingest(str(root))
    out = rows_by_key(outputs)
    assert {r["caption"] for r in out.values()} == {"a red ball", "a blue cup", "a tree"}
    assert out[path_key("imgs/d.png")]["image_ref"] == f"{root}/imgs/d.png"
    assert out[path_key("a.jpg")]["caption"] == "a red ball"  # the first occurrence is kept
    assert out[path_key("a.jpg")]["source_id"] == 1
    why = reasons(rejects)
    assert why[path_key("missing.jpg")] == ("missing_image", "missing.jpg not found in f/")
    assert why[path_key("b.jpg")][0] == "empty_caption"
    bad = sorted(d for k, (r, d) in why.items() if r == "bad_source_row")
    assert bad == ["line 10: caption field 'caption' is a JSON int",
                   "line 4: not valid JSON (Expecting property name enclosed in double quotes: "
                   "line 1 column 2 (char 1))"]
    assert why["captions.jsonl#5"] == ("image_not_allowed",
                                       "line 5: image path '../outside.jpg' climbs out of the source folder")
    assert [r for r, _ in why.values()].count("duplicate_key") == 1


def test_folder_csv(tmp_path):
    root = make_folder(tmp_path / "f", kind="csv")
    shards, outputs, rejects = ingest(str(root))
    out = rows_by_key(outputs)
    assert out[path_key("c.jpg")]["source_id"] == "6"  # CSV values are strings
    why = reasons(rejects)
    assert why["captions.csv#10"] == ("bad_source_row", "line 10: 4 fields, header has 3")
    # the first caption spans lines 2-3 (a quoted newline), so the escaping row starts on line 6
    assert why["captions.csv#6"] == ("image_not_allowed",
                                     "line 6: image path '../outside.jpg' climbs out of the source folder")
    assert out[path_key("a.jpg")]["caption"] == "a red ball"
    assert why[path_key("missing.jpg")][0] == "missing_image"


def test_folder_input_may_be_the_captions_file(tmp_path):
    root = make_folder(tmp_path / "f")
    assert rows_by_key(ingest(str(root / "captions.jsonl"))[1]).keys() == \
        rows_by_key(ingest(str(root))[1]).keys()


def test_folder_split_is_deterministic_and_covers_every_row_once(tmp_path):
    root = make_folder(tmp_path / "f")
    stage = IngestStage(IngestConfig(rows_per_shard=3))
    shards = stage.discover(str(root))
    assert shards == stage.discover(str(root))
    assert [(s.index, s.row_start, s.row_end) for s in shards] == [(0, 0, 3), (1, 3, 6), (2, 6, 9)]
    _, outputs, rejects = ingest(str(root), rows_per_shard=3)
    _, whole_out, whole_rej = ingest(str(root), rows_per_shard=100)
    keys = sorted(k for t in outputs + rejects for k in t["key"].to_pylist())
    assert keys == sorted(k for t in whole_out + whole_rej for k in t["key"].to_pylist())
    assert len(keys) == 9
    # keys hash the image path, so they do not depend on how the folder is split; only the repeated
    # a.jpg, now in another shard than its first occurrence, is no longer a (within-shard) duplicate
    def pairs(tables):
        return {(k, c) for t in tables for k, c in zip(t["key"].to_pylist(), t["caption"].to_pylist(), strict=True)}

    assert pairs(outputs) == pairs(whole_out) | {(path_key("a.jpg"), "a again")}


def test_folder_duplicates_across_shards_are_not_detected(tmp_path):
    root = make_folder(tmp_path / "f")
    _, outputs, _ = ingest(str(root), rows_per_shard=6)  # the repeated a.jpg lands in the second shard
    keys = [k for t in outputs for k in t["key"].to_pylist()]
    assert keys.count(path_key("a.jpg")) == 2


def test_folder_without_image_column_is_an_error(tmp_path):
    (tmp_path / "captions.jsonl").write_text(json.dumps({"caption": "x"}) + "\n")
    stage = IngestStage()
    with pytest.raises(SourceSchemaError, match=r"captions\.jsonl.*image"):
        stage.read(stage.discover(str(tmp_path))[0])


# --- parquet (LAION / COYO metadata) ---------------------------------------------------------------------

def make_laion(root: Path, n_files: int = 2, rows: int = 7) -> list[pa.Table]:
    root.mkdir()
    (root / "images").mkdir()
    tables = []
    for f in range(n_files):
        urls = [f"http://img.example/{f}-{i}.jpg" for i in range(rows)]
        texts = [f"photo {f}-{i}" for i in range(rows)]
        urls[5], texts[5] = urls[4], texts[4]  # an exact repeat of (url, caption)
        paths = [f"images/{f}-{i}.jpg" for i in range(rows)]
        for p in paths[:-1]:  # the last image is missing
            (root / p).write_bytes(jpeg((0, 0, 0)))
        t = pa.table({
            "URL": urls, "TEXT": texts,
            "WIDTH": pa.array([640.0, float("nan"), 0.0, 800.6, 32.0, 32.0, 1.0][:rows]),
            "HEIGHT": pa.array([480, None, 10, 600, 32, 32, 1][:rows], pa.int64()),
            "similarity": pa.array([0.3] * rows, pa.float32()),
            "image_path": paths,
        })
        pq.write_table(t, root / f"part-{f}.parquet", row_group_size=3)
        tables.append(t)
    (root / "_SUCCESS.parquet").write_bytes(b"")  # skipped: starts with an underscore
    return tables


def test_parquet_split_reads_exactly_each_slice(tmp_path):
    tables = make_laion(tmp_path / "laion")
    stage = IngestStage(IngestConfig(rows_per_shard=4))
    shards = stage.discover(str(tmp_path / "laion"))
    assert [(s.index, s.uri.rsplit("/", 1)[1], s.row_start, s.row_end) for s in shards] == [
        (0, "part-0.parquet", 0, 4), (1, "part-0.parquet", 4, 7),
        (2, "part-1.parquet", 0, 4), (3, "part-1.parquet", 4, 7)]
    for shard in shards:
        raw = stage.read(shard)
        source = tables[int(shard.uri[-9])].slice(shard.row_start, shard.row_end - shard.row_start)
        assert raw["caption"].to_pylist() == source["TEXT"].to_pylist()
        assert raw["similarity"].to_pylist() == source["similarity"].to_pylist()


def test_parquet_rows_keys_dimensions_and_rejects(tmp_path):
    make_laion(tmp_path / "laion", n_files=1)
    assert detect_format(str(tmp_path / "laion")) == "parquet"
    _, outputs, rejects = ingest(str(tmp_path / "laion"), rows_per_shard=100)
    out = rows_by_key(outputs)
    k0 = hashlib.sha256(b"http://img.example/0-0.jpg\x1fphoto 0-0").hexdigest()[:20]
    assert out[k0]["url"] == "http://img.example/0-0.jpg"
    assert out[k0]["image_ref"] == f"{tmp_path}/laion/images/0-0.jpg"
    assert (out[k0]["width"], out[k0]["height"]) == (640, 480)
    dims = {r["caption"]: (r["width"], r["height"]) for r in out.values()}
    assert dims["photo 0-1"] == (None, None)  # NaN and null
    assert dims["photo 0-2"] == (None, 10)  # zero width is not a size
    assert dims["photo 0-3"] == (801, 600)
    assert outputs[0].schema.field("similarity").type == pa.float32()
    assert "URL" not in outputs[0].schema.names and "TEXT" not in outputs[0].schema.names
    why = sorted(r for r, _ in reasons(rejects).values())
    assert why == ["duplicate_key", "missing_image"]


def test_parquet_without_images_needs_require_image_false(tmp_path):
    root = tmp_path / "meta"
    root.mkdir()
    pq.write_table(pa.table({"url": ["http://x/1.jpg"], "caption": ["a dog"]}), root / "m.parquet")
    stage = IngestStage()
    with pytest.raises(SourceSchemaError, match=r"m\.parquet.*require_image=false"):
        stage.read(stage.discover(str(root))[0])
    _, outputs, _ = ingest(str(root), require_image=False)
    assert [(r["caption"], r["image_ref"]) for r in outputs[0].to_pylist()] == [("a dog", None)]


def test_configured_column_names(tmp_path):
    root = tmp_path / "coyo"
    root.mkdir()
    pq.write_table(pa.table({"id": pa.array([11, 12], pa.int64()), "text": ["a", "b"], "u": ["x", "y"]}),
                   root / "c.parquet")
    _, outputs, _ = ingest(str(root), key_column="id", url_column="u", require_image=False)
    assert [(r["key"], r["caption"], r["url"]) for r in outputs[0].to_pylist()] == [("11", "a", "x"), ("12", "b", "y")]
    stage = IngestStage(IngestConfig(caption_column="nope", require_image=False))
    with pytest.raises(SourceSchemaError, match=r"c\.parquet: no column 'nope'"):
        stage.read(stage.discover(str(root))[0])


# --- grit20m ---------------------------------------------------------------------------------------------

def test_grit_published_samples_jsonl():
    uri = str(GRIT_SAMPLES.resolve())
    assert detect_format(uri) == "grit20m"
    _, outputs, rejects = ingest(uri)
    published = json.loads(GRIT_SAMPLES.read_text().splitlines()[0])
    (row,) = outputs[0].to_pylist()
    assert row["key"] == published["key"] and row["caption"] == published["caption"]
    assert row["image_ref"] is None
    assert row["src_noun_chunks"] == published["noun_chunks"]
    assert row["src_ref_exps"] == published["ref_exps"]
    assert row["id"] == published["id"]
    assert outputs[0].schema.field("src_noun_chunks").type == pa.list_(pa.list_(pa.float64()))
    assert [r for r, _ in reasons(rejects).values()] == ["bad_source_row", "bad_source_row"]  # no key


def test_grit_parquet_passthrough_types(tmp_path):
    published = json.loads(GRIT_SAMPLES.read_text().splitlines()[0])
    cols = ["key", "clip_similarity_vitb32", "clip_similarity_vitl14", "id", "url", "caption", "width",
            "height", "noun_chunks", "ref_exps"]
    t = pa.Table.from_pylist([{c: published[c] for c in cols}])
    pq.write_table(t, tmp_path / "grit.parquet")
    assert detect_format(str(tmp_path)) == "grit20m"
    _, outputs, _ = ingest(str(tmp_path))
    schema = outputs[0].schema
    assert schema.names[len(INGEST_SCHEMA):] == ["clip_similarity_vitb32", "clip_similarity_vitl14", "id",
                                                 "src_noun_chunks", "src_ref_exps"]
    assert schema.field("id").type == pa.int64()
    assert outputs[0]["src_ref_exps"].to_pylist() == [published["ref_exps"]]
    with pytest.raises(SourceSchemaError, match="require_image=false"):
        IngestStage(IngestConfig(require_image=True)).discover(str(tmp_path))


# --- detection and config --------------------------------------------------------------------------------

def test_detect_format_errors_clearly(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SourceSchemaError, match="set ingest.format"):
        detect_format(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        detect_format(str(tmp_path / "absent"))


def test_config_and_shard_validation():
    with pytest.raises(ValidationError):
        IngestConfig(format="tsv")
    with pytest.raises(ValidationError):
        IngestConfig(rows_per_shard=0)
    with pytest.raises(ValidationError):
        SourceShard(index=0, uri="x", format="folder", row_start=3)
    with pytest.raises(ValidationError):
        SourceShard(index=0, uri="x", format="folder", row_start=3, row_end=3)


# --- a real img2dataset run ------------------------------------------------------------------------------

I2D_SCRIPT = textwrap.dedent('''
    import functools, http.server, os, socketserver, sys, threading
    import pyarrow as pa, pyarrow.parquet as pq
    from PIL import Image
    from skimage import data

    def main(root):
        os.makedirs(f"{root}/www", exist_ok=True)
        for name in ("astronaut", "chelsea", "coffee"):
            Image.fromarray(getattr(data, name)()).save(f"{root}/www/{name}.jpg")
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=f"{root}/www")
        handler.log_message = lambda *a, **k: None
        server = socketserver.TCPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        names = ["astronaut", "chelsea", "missing", "coffee"]
        pq.write_table(pa.table({"url": [f"{base}/{n}.jpg" for n in names],
                                 "caption": ["an astronaut", "a cat\\non a sofa", "gone", "a cup"],
                                 "extra": [1, 2, 3, 4]}), f"{root}/urls.parquet")
        from img2dataset import download
        for fmt in ("webdataset", "files"):
            download(url_list=f"{root}/urls.parquet", input_format="parquet", url_col="url",
                     caption_col="caption", save_additional_columns=["extra"], output_folder=f"{root}/{fmt}",
                     output_format=fmt, processes_count=1, thread_count=2, image_size=64, resize_mode="no",
                     number_sample_per_shard=3, timeout=5, retries=0, enable_wandb=False,
                     distributor="multiprocessing")
        server.shutdown()

    if __name__ == "__main__":
        main(sys.argv[1])
''')


@pytest.mark.slow
def test_real_img2dataset_output(tmp_path):
    """img2dataset itself, offline against a local http.server, in both image layouts."""
    script = tmp_path / "download.py"
    script.write_text(I2D_SCRIPT)
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, env=env, timeout=600,
                   capture_output=True)
    for fmt, image_ref_start in (("webdataset", "tar://"), ("files", str(tmp_path))):
        out_dir = tmp_path / fmt
        assert detect_format(str(out_dir)) == "img2dataset"
        shards, outputs, rejects = ingest(str(out_dir))
        assert [s.index for s in shards] == [0, 1]
        out = rows_by_key(outputs)
        assert sorted(r["caption"] for r in out.values()) == ["a cat on a sofa", "a cup", "an astronaut"]
        (failed,) = [r for t in rejects for r in t.to_pylist()]
        assert failed["reason"] == "download_failed" and "404" in failed["detail"]
        for row in out.values():
            assert row["image_ref"].startswith(image_ref_start)
            with fsspec.open(row["image_ref"], "rb") as f:
                assert Image.open(f).size == (row["width"], row["height"])
            assert row["extra"] in (1, 2, 4)


def test_unparseable_jsonl_values_are_bad_rows_not_a_failed_shard(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg((0, 0, 0)))
    lines = ['{"file": "a.jpg", "caption": "lone \\ud800 surrogate"}',
             '[1, 2]',
             '{"file": "a.jpg", "caption": "a dog", "big": 123456789012345678901234567890, "mixed": 1}',
             '{"file": "b.jpg", "caption": "b", "mixed": {"x": 1}}']
    (tmp_path / "b.jpg").write_bytes(jpeg((0, 0, 0)))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    _, outputs, rejects = ingest(str(tmp_path))
    assert sorted(d for r, d in reasons(rejects).values()) == [
        "line 1: holds an unpaired UTF-16 surrogate escape", "line 2: a JSON list, not an object"]
    out = {r["caption"]: r for r in outputs[0].to_pylist()}
    # values Arrow cannot hold in one typed column pass through as JSON text
    assert out["a dog"]["big"] == "123456789012345678901234567890"
    assert (out["a dog"]["mixed"], out["b"]["mixed"]) == ("1", '{"x": 1}')


def test_an_empty_shard_gives_empty_tables(tmp_path):
    write_i2d_shard(tmp_path, "00000", [("000000", "success", None, "a dog", True)], "webdataset")
    t = pq.read_table(tmp_path / "00000.parquet")
    pq.write_table(t.slice(0, 0), tmp_path / "00000.parquet")
    _, outputs, rejects = ingest(str(tmp_path))
    assert outputs[0].num_rows == 0 and rejects[0].num_rows == 0


def test_relative_local_input_gives_absolute_image_refs(tmp_path, monkeypatch):
    make_folder(tmp_path / "f")
    monkeypatch.chdir(tmp_path)
    shards, outputs, _ = ingest("f")
    assert shards[0].uri == f"{tmp_path}/f/captions.jsonl"
    assert rows_by_key(outputs)[path_key("c.jpg")]["image_ref"] == f"{tmp_path}/f/c.jpg"


def test_process_batch_on_a_hand_built_table():
    """Tables not made by `read` (no reader columns) still validate; images only if required."""
    table = pa.table({"key": ["a", "b", "c"], "shard": pa.array([5, 5, 5], pa.int32()),
                      "caption": [" x ", None, "y"], "image_ref": ["/i/a.jpg", None, None],
                      "width": pa.array(["640", "wide", None]), "lang": ["en", "de", "fr"]})
    res = IngestStage().process_batch(table)
    assert [(r["key"], r["caption"], r["width"], r["lang"], r["url"]) for r in res.output.to_pylist()] == \
        [("a", "x", 640, "en", None), ("c", "y", None, "fr", None)]
    assert reasons([res.rejects]) == {"b": ("empty_caption", "caption is null")}
    res = IngestStage(IngestConfig(require_image=True)).process_batch(table)
    assert reasons([res.rejects])["c"] == ("missing_image", "no image_ref")


def test_parquet_image_paths_outside_the_folder_are_refused_unless_allowed(tmp_path):
    root = tmp_path / "meta"
    (root / "images").mkdir(parents=True)
    (root / "images" / "ok.jpg").write_bytes(jpeg((0, 0, 0)))
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(jpeg((9, 9, 9)))
    paths = ["images/ok.jpg", "../outside.jpg", str(outside), f"file://{outside}"]
    pq.write_table(pa.table({"url": [f"u{i}" for i in range(4)], "caption": [f"a photo {i}" for i in range(4)],
                             "image_path": paths}), root / "part-0.parquet")

    def refs(**cfg):
        stage = IngestStage(IngestConfig(**cfg))
        result = stage.process_batch(stage.read(stage.discover(str(root))[0]))
        kept = dict(zip(result.output["caption"].to_pylist(), result.output["image_ref"].to_pylist(), strict=True))
        reasons = dict(zip(result.rejects["key"].to_pylist(), result.rejects["reason"].to_pylist(), strict=True))
        return kept, reasons

    kept, rejected = refs()
    assert kept == {"a photo 0": f"{root}/images/ok.jpg"}
    assert list(rejected.values()) == ["image_not_allowed"] * 3  # more cases: tests/test_image_refs.py
    kept, _ = refs(external_images=True)
    assert set(kept) == {"a photo 0", "a photo 2", "a photo 3"}  # "../" never escapes the folder
