"""The detect stage as the engine runs it: prepare_batch (read + decode) then process_batch, bad images
rejected with their reason while the rest of the batch comes out, reproducible bytes, resources, and a
planted detection flowing through select and compose to the exact grounded caption."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import io
import struct
import tarfile
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from schemas.tables import CHUNK_TYPE, DETECT_SCHEMA, INGEST_FIELDS, REJECT_SCHEMA
from stages.base import Stage
from stages.detect import DetectConfig, DetectStage
from stages.detectors import tiny
from stages.detectors.config import DetectExecution
from stages.registry import stage_class

CAPTION = "a dog in a field of flowers"
SPANS = [(0, 5, 0, 27), (9, 16, 9, 27), (20, 27, 20, 27)]  # a dog / a field / flowers, with expressions


def chunk(s, e, xs=None, xe=None):
    return {"start": s, "end": e, "root_start": s, "root_end": e, "expr_start": s if xs is None else xs,
            "expr_end": e if xe is None else xe, "has_conj": False}


def encode(im, fmt="JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def png_header_only(w, h) -> bytes:
    def chunk_(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk_(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk_(b"IEND", b"")


def table_of(keys, refs, chunks=None) -> pa.Table:
    n = len(keys)
    chunks = chunks if chunks is not None else [[chunk(s, e, xs, xe) for s, e, xs, xe in SPANS]] * n
    return pa.table({"key": keys, "caption": [CAPTION] * n, "image_ref": refs,
                     "chunks": pa.array(chunks, pa.list_(CHUNK_TYPE))})


@pytest.fixture(scope="module")
def mixed_batch(tmp_path_factory):
    """Good images of several kinds and sizes interleaved with every kind of bad one."""
    d = tmp_path_factory.mktemp("images")
    palette = Image.new("P", (60, 40), 1)
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    sixteen = Image.fromarray(np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21)
    jpeg = encode(photo(300, 200))
    files = {
        "good_jpeg": jpeg,
        "truncated": jpeg[: len(jpeg) // 2],
        "good_png": encode(photo(120, 180, 1), "PNG"),
        "zero_bytes": b"",
        "cmyk": encode(Image.new("CMYK", (80, 60), (0, 255, 255, 0))),
        "garbage": np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "sixteen_bit": encode(sixteen, "PNG"),
        "bomb_header": png_header_only(30000, 30000),
        "palette_alpha": encode(palette, "PNG", transparency=0),
        "one_pixel": encode(Image.new("RGB", (1, 1)), "PNG"),
    }
    refs = {}
    for key, data in files.items():
        path = d / f"{key}.img"
        path.write_bytes(data)
        refs[key] = str(path)
    tar_path = d / "shard-00000.tar"
    with tarfile.open(tar_path, "w") as tar:
        payload = encode(photo(90, 140, 2))
        info = tarfile.TarInfo("000007.jpg")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    refs["tar_member"] = f"tar://000007.jpg::{tar_path}"
    refs["tar_missing_member"] = f"tar://000099.jpg::{tar_path}"
    refs["missing_file"] = str(d / "nowhere.jpg")
    refs["no_ref"] = None
    return table_of(list(refs), list(refs.values()))


EXPECTED_REJECTS = {
    "truncated": "image_decode_error", "zero_bytes": "image_decode_error", "garbage": "image_decode_error",
    "bomb_header": "image_too_large", "one_pixel": "image_too_small", "tar_missing_member": "image_unreadable",
    "missing_file": "image_unreadable", "no_ref": "image_unreadable",
}
EXPECTED_GOOD = ["good_jpeg", "good_png", "cmyk", "sixteen_bit", "palette_alpha", "tar_member"]


def test_prepare_batch_rejects_bad_images_and_keeps_the_rest(mixed_batch):
    stage = DetectStage(DetectConfig(input_size=64, max_size=100))  # prepare never loads the model
    result = stage.prepare_batch(mixed_batch)
    assert result.rejects.schema == REJECT_SCHEMA
    assert {r["key"]: r["reason"] for r in result.rejects.to_pylist()} == EXPECTED_REJECTS
    assert set(result.rejects["stage"].to_pylist()) == {"detect"}
    out = result.output
    assert out["key"].to_pylist() == EXPECTED_GOOD  # source order kept
    assert out.num_rows + result.rejects.num_rows == mixed_batch.num_rows
    rows = out.select(["key", "pix_w", "pix_h", "img_w", "img_h"]).to_pylist()
    sizes = {r["key"]: (r["pix_w"], r["pix_h"]) for r in rows}
    assert sizes["good_jpeg"] == (96, 64) and sizes["good_png"] == (64, 96) and sizes["tar_member"] == (64, 99)
    # 90 x 140 -> 64 x 99: the longer side truncated (99.6), as GroundingDINO's get_size_with_aspect_ratio does
    originals = {r["key"]: (r["img_w"], r["img_h"]) for r in rows}
    assert originals["good_jpeg"] == (300, 200) and originals["tar_member"] == (90, 140)
    for blob, r in zip(out["pixels"].to_pylist(), rows, strict=True):
        assert len(blob) == r["pix_h"] * r["pix_w"] * 3


# --- the replay backend checks images too (detect.check_images) ----------------------------------------


def replay_stage(tmp_path, keys=(), **config) -> DetectStage:
    """The replay backend with one good box per key of `keys` (for chunk 0)."""
    path = tmp_path / "replay.parquet"
    n = len(keys)
    pq.write_table(pa.table({"key": pa.array(list(keys), pa.string()), "x1": [0.1] * n, "y1": [0.1] * n,
                             "x2": [0.6] * n, "y2": [0.7] * n, "score": pa.array([0.9] * n, pa.float32()),
                             "chunk": pa.array([0] * n, pa.int32())}), path)
    return DetectStage(DetectConfig(backend="replay", replay_path=str(path), **config))


def reasons(rejects: pa.Table) -> dict[str, str]:
    return {r["key"]: r["reason"] for r in rejects.to_pylist()}


WITH_IMAGE_REJECTS = {k: v for k, v in EXPECTED_REJECTS.items() if k != "no_ref"}


@pytest.mark.parametrize("limits", [{}, {"max_image_bytes": 3000}, {"min_image_side": 100},
                                    {"max_image_pixels": 20_000}])
def test_replay_rejects_the_images_a_pixel_detector_rejects_with_the_same_reasons(mixed_batch, tmp_path, limits):
    """Every row with an image_ref ends alike; the row without one passes replay (check_images=None)."""
    pixel = DetectStage(DetectConfig(input_size=64, max_size=100, **limits)).prepare_batch(mixed_batch)
    replay = replay_stage(tmp_path, **limits).prepare_batch(mixed_batch)
    expected = reasons(pixel.rejects)
    assert expected.pop("no_ref") == "image_unreadable"
    assert reasons(replay.rejects) == expected
    if not limits:
        assert expected == WITH_IMAGE_REJECTS
    else:
        assert set(expected) > set(WITH_IMAGE_REJECTS)  # the tighter limit rejects more
    with_image = replay.output.filter(pc.is_valid(replay.output["image_ref"]))
    size = ["key", "img_w", "img_h"]
    assert with_image.select(size).to_pylist() == pixel.output.select(size).to_pylist()
    assert "pixels" not in replay.output.column_names  # checked, not decoded for a model


def test_replay_process_batch_alone_checks_images_as_well(mixed_batch, tmp_path):
    result = replay_stage(tmp_path, keys=mixed_batch["key"].to_pylist()).process_batch(mixed_batch)
    assert reasons(result.rejects) == WITH_IMAGE_REJECTS
    assert result.output["key"].to_pylist() == [*EXPECTED_GOOD, "no_ref"]


def test_check_images_false_never_opens_an_image(mixed_batch, tmp_path):
    stage = replay_stage(tmp_path, keys=mixed_batch["key"].to_pylist(), check_images=False)
    prepared = stage.prepare_batch(mixed_batch)
    assert prepared.rejects.num_rows == 0 and prepared.output.equals(mixed_batch)
    result = stage.process_batch(mixed_batch)
    assert result.rejects.num_rows == 0 and result.output.num_rows == mixed_batch.num_rows


def test_rows_without_images_pass_unless_check_images_is_true(tmp_path):
    keys = ["g0", "g1"]
    metadata_only = table_of(keys, pa.nulls(2, pa.string()))  # GRIT-20M metadata: no image at all
    prepared = replay_stage(tmp_path, keys=keys).prepare_batch(metadata_only)
    assert prepared.rejects.num_rows == 0 and prepared.output.equals(metadata_only)  # not even looked at
    strict = replay_stage(tmp_path, check_images=True).prepare_batch(metadata_only)
    assert reasons(strict.rejects) == {"g0": "image_unreadable", "g1": "image_unreadable"}


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    return tiny.hf_grounding_dino(tmp_path_factory.mktemp("gd") / "model")


def hf_stage(model, **kw):
    return DetectStage(DetectConfig(backend="hf", hf_model=model, floor=0.0, max_candidates=12, input_size=96,
                                    max_size=160, **kw), DetectExecution(device="cpu", gpus=0))


def test_process_batch_detects_good_images_among_bad_ones(mixed_batch, hf_model):
    result = hf_stage(hf_model).process_batch(mixed_batch)  # no prepare_batch: the stage decodes itself
    assert result.output.schema == DETECT_SCHEMA
    assert result.output["key"].to_pylist() == EXPECTED_GOOD
    assert {r["key"]: r["reason"] for r in result.rejects.to_pylist()} == EXPECTED_REJECTS
    for row in result.output.to_pylist():  # the 12 best, plus each chunk's 5 best (chunk_candidates)
        chunks = [c["chunk"] for c in row["candidates"]]
        assert 12 <= len(chunks) <= 12 + 3 * 5 and all(chunks.count(j) >= 5 for j in range(3))
        assert all(-1 <= c["chunk"] < 3 and 0 <= c["x1"] < c["x2"] <= 1 for c in row["candidates"])


def test_same_input_same_bytes(mixed_batch, hf_model, tmp_path):
    blobs = []
    for run in range(2):
        stage = hf_stage(hf_model)
        prepared = stage.prepare_batch(mixed_batch)
        result = stage.process_batch(prepared.output)
        path = tmp_path / f"run{run}.parquet"
        pq.write_table(result.output, path)
        blobs.append(path.read_bytes())
    assert blobs[0] == blobs[1]


def test_rows_without_chunks_are_rejected(tmp_path):
    replay = tmp_path / "r.parquet"
    pq.write_table(pa.table({"key": ["a", "b"], "x1": [0.1, 0.1], "y1": [0.1, 0.1], "x2": [0.5, 0.5],
                             "y2": [0.5, 0.5], "score": [0.9, 0.9], "chunk": [0, 0]}), replay)
    table = table_of(["a", "b"], [None, None], chunks=[[chunk(0, 5)], []])
    result = DetectStage(DetectConfig(backend="replay", replay_path=str(replay))).process_batch(table)
    assert result.output["key"].to_pylist() == ["a"]
    assert result.rejects.to_pylist() == [{"key": "b", "stage": "detect", "reason": "no_detection",
                                           "detail": "row has no chunks to ground"}]


def test_empty_batch(hf_model):
    result = hf_stage(hf_model).process_batch(table_of([], []))
    assert result.output.num_rows == 0 and result.output.schema == DETECT_SCHEMA


def test_contract_and_resources():
    assert stage_class("detect") is DetectStage and issubclass(DetectStage, Stage)
    assert DetectStage.name == "detect" and DetectStage.version == 3 and DetectStage.output_schema == DETECT_SCHEMA
    r = DetectStage(DetectConfig(), DetectExecution(gpus=0.5, batch_size=16, pool_size=4)).resources
    assert (r.actor, r.gpus, r.batch_size, r.pool_size) == (True, 0.5, 16, 4)
    assert DetectStage(DetectConfig(), DetectExecution(device="cpu")).resources.gpus == 0
    with pytest.raises(ValueError):
        DetectConfig(flor=0.2)  # typos fail loudly
    with pytest.raises(ValueError):
        DetectExecution(precision="bf16")  # detect.precision since v3
    assert DetectConfig().precision == "fp32" and DetectConfig().prompt == "caption"
    assert DetectConfig().chunk_score == "mean"


# --- a planted detection through select and compose ---------------------------------------------------

DOG = (0.1, 0.2, 0.5, 0.9)


def test_planted_detection_flows_to_the_grounded_caption(tmp_path):
    select_mod = pytest.importorskip("stages.select")
    compose_mod = pytest.importorskip("stages.compose")
    replay = tmp_path / "planted.parquet"
    rows = [
        ("paper", *DOG, 0.90, 0),  # a dog: kept
        ("paper", 0.0, 0.5, 1.0, 1.0, 0.50, 1),  # a field: under select's 0.65
        ("paper", 0.11, 0.21, 0.5, 0.9, 0.70, 2),  # flowers: nearly the dog's box, suppressed by NMS
        ("paper", 0.6, 0.0, 0.9, 0.3, 0.95, -1),  # unassigned: dropped by select
        ("paper", 0.2, 0.2, 0.4, 0.4, 0.05, 0),  # under detect's floor
        ("elsewhere", 0.1, 0.1, 0.2, 0.2, 0.99, 0),  # a key not in the batch
    ]
    cols = list(zip(*rows, strict=True))
    pq.write_table(pa.table({"key": list(cols[0]), "x1": list(cols[1]), "y1": list(cols[2]), "x2": list(cols[3]),
                             "y2": list(cols[4]), "score": pa.array(cols[5], pa.float32()),
                             "chunk": pa.array(cols[6], pa.int32())}), replay)

    chunks = [[chunk(s, e, xs, xe) for s, e, xs, xe in SPANS]]
    ingest = pa.table({"key": ["paper"], "shard": pa.array([0], pa.int32()), "url": ["http://x/dog.jpg"],
                       "caption": [CAPTION], "width": pa.array([640], pa.int32()),
                       "height": pa.array([480], pa.int32()), "image_ref": pa.array([None], pa.string()),
                       "image_offset": pa.array([None], pa.int64()), "image_size": pa.array([None], pa.int64())},
                      schema=pa.schema(INGEST_FIELDS))
    table = ingest.append_column("chunks", pa.array(chunks, pa.list_(CHUNK_TYPE)))

    detect = DetectStage(DetectConfig(backend="replay", replay_path=str(replay)))
    detected = detect.process_batch(detect.prepare_batch(table).output)
    assert detected.rejects.num_rows == 0
    assert len(detected.output["candidates"][0].as_py()) == 4  # the 0.05 entry is under the floor

    table = table.append_column("candidates", detected.output["candidates"])
    selected = select_mod.SelectStage().process_batch(table)
    assert selected.rejects.num_rows == 0
    table = table.append_column("pairs", selected.output["pairs"])
    composed = compose_mod.ComposeStage().process_batch(table)
    assert composed.rejects.num_rows == 0
    row = composed.output.to_pylist()[0]
    # the dog's chunk expands to the whole caption; floor(0.1*32)=3, floor(0.2*32)=6 -> 6*32+3 = 195;
    # floor(0.5*32)=16, floor(0.9*32)=28 -> 28*32+16 = 912
    assert row["grounded_caption"] == ("<grounding><phrase> a dog in a field of flowers</phrase>"
                                       "<object><patch_index_0195><patch_index_0912></object>")
    assert row["markdown_caption"] == "[a dog in a field of flowers](<patch_index_0195><patch_index_0912>)"
    assert row["noun_chunks"] == [[0, 5, *DOG, pytest.approx(0.9)]]
    assert row["ref_exps"] == [[0, 27, *DOG, pytest.approx(0.9)]]
