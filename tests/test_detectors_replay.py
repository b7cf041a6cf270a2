"""The replay backend: a Parquet of precomputed detections, and GRIT-20M's own `noun_chunks` boxes."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.tables import CHUNK_TYPE, DETECT_SCHEMA
from stages.detect import DetectConfig, DetectStage
from stages.detectors.base import ChunkPrompt, ImageInput
from stages.detectors.config import DetectExecution
from stages.detectors.replay import REPLAY_SCHEMA, ReplayDetector, box_ids_from_corners, check_entries

CAPTION = "a dog in a field of flowers"
SPANS = [(0, 5), (9, 16), (20, 27)]


def chunk(s, e):
    return {"start": s, "end": e, "root_start": s, "root_end": e, "expr_start": s, "expr_end": e, "has_conj": False}


def batch(keys, spans=SPANS, src=None) -> pa.Table:
    data = {"key": keys, "caption": [CAPTION] * len(keys), "image_ref": [None] * len(keys),
            "chunks": pa.array([[chunk(s, e) for s, e in spans]] * len(keys), pa.list_(CHUNK_TYPE))}
    if src is not None:
        data["src_noun_chunks"] = pa.array(src, pa.list_(pa.list_(pa.float64())))
    return pa.table(data)


def write_replay(path, rows: list[dict], schema=REPLAY_SCHEMA) -> str:
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    pq.write_table(pa.table(cols, schema=schema), path)
    return str(path)


def det(key, x1, y1, x2, y2, score, chunk=None, box=None, start=None, end=None):
    return {"key": key, "x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": score, "chunk": chunk, "box": box,
            "start": start, "end": end}


def run(path, table, **cfg):
    stage = DetectStage(DetectConfig(backend="replay", replay_path=path, **cfg))
    prepared = stage.prepare_batch(table)
    assert prepared.output is table  # replay needs no pixels: prepare is the identity
    return stage.process_batch(prepared.output)


def rows_of(result):
    return {r["key"]: r["candidates"] for r in result.output.to_pylist()}


def rejects_of(result):
    return {r["key"]: (r["reason"], r["detail"]) for r in result.rejects.to_pylist()}


def test_file_mode_candidates_and_ignored_keys(tmp_path):
    path = write_replay(tmp_path / "r.parquet", [
        det("k1", 0.1, 0.2, 0.5, 0.9, 0.9, chunk=0),
        det("k1", 0.1, 0.2, 0.5, 0.9, 0.4, chunk=2),  # same corners: same box, second chunk
        det("k1", 0.0, 0.5, 1.0, 1.0, 0.7, chunk=1),
        det("other", 0.1, 0.1, 0.2, 0.2, 0.99, chunk=0),  # not in the batch: ignored
        det("k2", 0.3, 0.3, 0.6, 0.6, 0.8, chunk=-1),
    ])
    result = run(path, batch(["k1", "k2", "k3"]))
    assert result.output.schema == DETECT_SCHEMA
    out = rows_of(result)
    assert list(out) == ["k1", "k2"]
    assert [(c["box"], c["chunk"], c["score"]) for c in out["k1"]] == [
        (0, 0, pytest.approx(0.9)), (0, 2, pytest.approx(0.4)), (1, 1, pytest.approx(0.7))]
    assert out["k1"][0]["box_score"] == pytest.approx(0.9) and out["k1"][1]["box_score"] == pytest.approx(0.9)
    assert (out["k1"][2]["x1"], out["k1"][2]["y2"]) == (0.0, 1.0)
    assert out["k2"][0]["chunk"] == -1
    assert rejects_of(result) == {"k3": ("no_detection", "key not in replay file")}


def test_file_mode_spans_instead_of_chunk_indices(tmp_path):
    path = write_replay(tmp_path / "r.parquet", [
        det("k", 0.1, 0.1, 0.4, 0.4, 0.8, start=20, end=27),  # "flowers": chunk 2
        det("k", 0.5, 0.5, 0.9, 0.9, 0.7, start=2, end=5),  # "dog" is no chunk: unassigned
    ], schema=REPLAY_SCHEMA.remove(REPLAY_SCHEMA.get_field_index("chunk")))
    out = rows_of(run(path, batch(["k"])))
    assert [(c["chunk"], c["score"]) for c in out["k"]] == [(2, pytest.approx(0.8)), (-1, pytest.approx(0.7))]


def test_file_mode_box_ids_group_entries(tmp_path):
    path = write_replay(tmp_path / "r.parquet", [
        det("k", 0.1, 0.1, 0.4, 0.4, 0.5, chunk=0, box=7),
        det("k", 0.1, 0.1, 0.4, 0.4, 0.6, chunk=1, box=3),  # same corners, other box id: another box
        det("k", 0.1, 0.1, 0.4, 0.4, 0.9, chunk=2, box=7),
    ])
    out = rows_of(run(path, batch(["k"])))["k"]
    assert [(c["box"], c["chunk"]) for c in out] == [(0, 0), (0, 2), (1, 1)]  # box 7 (best 0.9) first
    assert [c["box_score"] for c in out] == pytest.approx([0.9, 0.9, 0.6])


def test_bad_entries_are_dropped_and_all_bad_is_bad_detection(tmp_path):
    path = write_replay(tmp_path / "r.parquet", [
        det("mixed", 0.1, 0.1, 0.4, 0.4, 0.8, chunk=0),  # the one good entry
        det("mixed", float("nan"), 0.1, 0.4, 0.4, 0.8, chunk=0),
        det("mixed", 0.5, 0.1, 0.4, 0.4, 0.8, chunk=1),  # inverted
        det("mixed", 0.1, 0.1, 1.4, 0.4, 0.8, chunk=1),  # outside the image
        det("mixed", 0.1, 0.1, 0.4, 0.4, 1.5, chunk=1),  # score > 1
        det("mixed", 0.1, 0.1, 0.4, 0.4, 0.8, chunk=3),  # only 3 chunks
        det("mixed", 0.2, 0.2, 0.3, 0.3, float("inf"), chunk=1),
        det("noise", -1e-9, 0.0, 1.0 + 1e-9, 0.5, 0.8, chunk=1),  # float noise: clamped, kept
        det("allbad", 0.5, 0.5, 0.5, 0.9, 0.8, chunk=0),  # zero width
        det("allbad", 0.1, 0.1, 0.4, 0.4, 0.8, chunk=-2),
    ])
    result = run(path, batch(["mixed", "noise", "allbad"]))
    out = rows_of(result)
    assert [(c["chunk"], c["x1"], c["x2"]) for c in out["mixed"]] == [(0, 0.1, 0.4)]
    assert (out["noise"][0]["x1"], out["noise"][0]["x2"]) == (0.0, 1.0)
    reason, detail = rejects_of(result)["allbad"]
    assert reason == "bad_detection"
    assert detail == "all 2 replayed boxes unusable: 1 box_inverted, 1 chunk_out_of_range"


def test_check_entries_counts_each_problem_once():
    xyxy = np.array([[0.1, 0.1, 0.4, 0.4], [np.nan, 0, 1, 1], [0.9, 0.1, 0.4, 2.0], [0.1, 0.1, 0.2, 0.2]])
    keep, clamped, problems = check_entries(xyxy, np.array([0.5, 0.5, 0.5, -0.1]), np.array([0, 0, 0, 0]), 1)
    assert keep.tolist() == [True, False, False, False]
    assert problems == {"non_finite": 1, "box_out_of_range": 1, "score_out_of_range": 1}


def test_floor_and_cap_apply_to_replayed_boxes(tmp_path):
    rows = [det("k", 0.01 * i, 0.0, 0.01 * i + 0.1, 0.1, 0.05 + 0.1 * i, chunk=i % 3) for i in range(9)]
    path = write_replay(tmp_path / "r.parquet", rows)
    out = rows_of(run(path, batch(["k"]), floor=0.3, max_candidates=4, chunk_candidates=0))["k"]
    assert sorted(round(c["score"], 2) for c in out) == [0.55, 0.65, 0.75, 0.85]
    # each chunk's best entry kept before the cap (chunk 0's 0.65 is not among the best two)
    out = rows_of(run(path, batch(["k"]), floor=0.3, max_candidates=2, chunk_candidates=1))["k"]
    assert sorted((c["chunk"], round(c["score"], 2)) for c in out) == [(0, 0.65), (1, 0.75), (2, 0.85)]
    below = run(path, batch(["k"]), floor=0.9)
    assert rejects_of(below)["k"][0] == "no_detection"


def test_not_a_replay_file_names_the_schema(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"key": ["a"], "boxes": [[0.1, 0.2]]}), path)
    with pytest.raises(ValueError, match="not a replay file"):
        ReplayDetector(path=str(path))


def test_file_mode_needs_a_path():
    with pytest.raises(ValueError, match="replay_path"):
        DetectStage(DetectConfig(backend="replay")).setup()


# --- grit20m mode ------------------------------------------------------------------------------------


def test_grit20m_mode_turns_source_noun_chunks_into_candidates():
    src = [
        [[20, 27, 0.3, 0.6, 0.7, 0.95, 0.9], [0, 5, 0.1, 0.2, 0.5, 0.9, 0.7], [2, 5, 0.2, 0.2, 0.4, 0.4, 0.8]],
        None,
        [[0, 5, 0.5, 0.1, 0.4, 0.9, 0.7]],  # inverted: its only box is unusable
        [[0, 5, 0.1, 0.2, 0.5], [9, 16, 0.0, 0.5, 1.0, 1.0, 0.66]],  # first entry malformed (5 values)
    ]
    result = run(None, batch(["a", "b", "c", "d"], src=src), replay_mode="grit20m")
    out = rows_of(result)
    # spans (20, 27) and (0, 5) are chunks 2 and 0; (2, 5) matches no chunk
    assert [(c["box"], c["chunk"], round(c["score"], 2)) for c in out["a"]] == [(0, 2, 0.9), (1, -1, 0.8), (2, 0, 0.7)]
    assert [out["a"][0][k] for k in ("x1", "y1", "x2", "y2")] == [0.3, 0.6, 0.7, 0.95]
    assert [(c["chunk"], round(c["score"], 2)) for c in out["d"]] == [(1, 0.66)]
    rejects = rejects_of(result)
    assert rejects["b"] == ("no_detection", "row has no src_noun_chunks boxes")
    assert rejects["c"][0] == "bad_detection"


def test_grit20m_detector_direct():
    d = ReplayDetector(mode="grit20m", floor=0.0)
    prompt = ChunkPrompt.from_caption(CAPTION, SPANS)
    [dets] = d.detect([ImageInput("k", None, [[9, 16, 0.0, 0.5, 1.0, 1.0, 0.5]])], [prompt])
    assert dets.chunk.tolist() == [1] and dets.xyxy.tolist() == [[0.0, 0.5, 1.0, 1.0]]


def test_box_ids_from_corners_in_order_of_first_appearance():
    xyxy = np.array([[0.5, 0.5, 0.9, 0.9], [0.1, 0.1, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9]])
    assert box_ids_from_corners(xyxy).tolist() == [0, 1, 0]


def test_replay_needs_no_image_and_no_gpu():
    stage = DetectStage(DetectConfig(backend="replay", replay_mode="grit20m"), DetectExecution(gpus=1.0))
    assert stage.resources.gpus == 0 and stage.resources.actor
    assert not stage.detector.needs_pixels
    assert math.isclose(stage.config.floor, 0.1)
