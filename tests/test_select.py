"""Tests of the select stage: threshold, class-agnostic NMS over chunk-box pairs, rejects, determinism."""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError
from torchvision.ops import box_iou, nms

from schemas.tables import CANDIDATE_TYPE, CHUNK_TYPE, REJECT_SCHEMA, SELECT_SCHEMA
from stages.select import NMS_BLOCK, SelectConfig, SelectStage

GRIT_SAMPLES = Path(__file__).resolve().parent / "data" / "grit_published_samples.jsonl"


def cand(box: int, chunk: int, x1: float, y1: float, x2: float, y2: float, score: float) -> dict:
    return {"box": box, "chunk": chunk, "x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": score,
            "box_score": score}


def batch(rows: dict[str, list[dict] | None], n_chunks: int | None = None) -> pa.Table:
    cols = {"key": pa.array(list(rows), pa.string()),
            "candidates": pa.array(list(rows.values()), pa.list_(CANDIDATE_TYPE))}
    if n_chunks is not None:
        chunk = {"start": 0, "end": 1, "root_start": 0, "root_end": 1, "expr_start": 0, "expr_end": 1,
                 "has_conj": False}
        cols["chunks"] = pa.array([[chunk] * n_chunks] * len(rows), pa.list_(CHUNK_TYPE))
    return pa.table(cols)


def run(rows: dict[str, list[dict] | None], n_chunks: int | None = None, **cfg):
    table = batch(rows, n_chunks)
    result = SelectStage(SelectConfig(**cfg)).process_batch(table)
    assert result.output.schema == SELECT_SCHEMA
    assert result.rejects.schema == REJECT_SCHEMA
    assert result.output.num_rows + result.rejects.num_rows == table.num_rows
    pairs = {r["key"]: r["pairs"] for r in result.output.to_pylist()}
    rejects = {r["key"]: (r["reason"], r["detail"]) for r in result.rejects.to_pylist()}
    return pairs, rejects


def iou(a: dict, b: dict) -> float:
    t = torch.tensor([[a["x1"], a["y1"], a["x2"], a["y2"]], [b["x1"], b["y1"], b["x2"], b["y2"]]],
                     dtype=torch.float64)
    return float(box_iou(t[:1], t[1:])[0, 0])


# --- threshold -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("min_score", [0.65, 0.3, 0.7, 0.75])
def test_score_equal_to_min_score_is_dropped_and_the_next_float_up_kept(min_score):
    at = float(np.float32(min_score))
    above = float(np.nextafter(np.float32(min_score), np.float32(1)))
    pairs, rejects = run({"at": [cand(0, 0, .1, .1, .5, .5, at)],
                          "above": [cand(0, 0, .1, .1, .5, .5, above)]}, min_score=min_score)
    assert rejects["at"][0] == "no_box"
    assert "min_score" in rejects["at"][1]
    assert [p["score"] for p in pairs["above"]] == [pytest.approx(above)]


def test_default_min_score_is_the_papers():
    assert SelectConfig().min_score == 0.65
    pairs, rejects = run({"k": [cand(0, 0, .1, .1, .5, .5, .66), cand(1, 1, .6, .6, .9, .9, .64)]})
    assert [p["chunk"] for p in pairs["k"]] == [0]


# --- NMS: the paper's rule (nms_scope pair, the default) ---------------------------------------------------

def test_defaults_are_the_papers_rule_at_an_iou_the_published_row_survives():
    cfg = SelectConfig()
    assert cfg.nms_scope == "pair"
    row = published_grit_row()
    a, b = (cand(i, i, *e[2:6], e[6]) for i, e in enumerate(row["noun_chunks"][:2]))
    assert iou(a, b) < cfg.nms_iou < 0.75  # just above the overlap the release kept


def test_same_box_for_two_chunks_survives_for_its_best_chunk_only():
    pairs, _ = run({"k": [cand(0, 0, .1, .1, .5, .5, .7), cand(0, 1, .1, .1, .5, .5, .9),
                          cand(0, 2, .1, .1, .5, .5, .8)]})
    assert [(p["chunk"], round(p["score"], 1)) for p in pairs["k"]] == [(1, 0.9)]


def test_same_box_equal_scores_goes_to_the_lower_chunk_whatever_the_order():
    a, b = cand(0, 1, .1, .1, .5, .5, .8), cand(0, 0, .1, .1, .5, .5, .8)
    first, _ = run({"k": [a, b]})
    second, _ = run({"k": [b, a]})
    assert first == second
    assert [p["chunk"] for p in first["k"]] == [0]


def test_identical_boxes_with_different_ids_count_as_one_box():
    # two detector boxes with the same corners (GLIP: one detection per phrase) for two chunks
    pairs, _ = run({"k": [cand(0, 0, .1, .1, .5, .5, .75), cand(1, 1, .1, .1, .5, .5, .85)]})
    assert [p["chunk"] for p in pairs["k"]] == [1]


def test_overlapping_boxes_of_two_chunks_keep_only_the_better_one():
    a, b = cand(0, 0, .10, .10, .50, .50, .80), cand(1, 1, .12, .11, .52, .50, .90)
    assert iou(a, b) > SelectConfig().nms_iou
    pairs, _ = run({"k": [a, b]})
    assert [(p["chunk"], round(p["score"], 2)) for p in pairs["k"]] == [(1, 0.90)]


def test_boxes_overlapping_below_nms_iou_both_survive():
    a, b = cand(0, 0, .10, .10, .50, .50, .80), cand(1, 1, .30, .10, .70, .50, .90)
    assert 0 < iou(a, b) < 0.5
    pairs, _ = run({"k": [a, b]})
    assert sorted(p["chunk"] for p in pairs["k"]) == [0, 1]


def test_nms_iou_decides_between_the_default_and_a_stricter_threshold():
    a, b = cand(0, 0, .10, .10, .50, .50, .80), cand(1, 1, .20, .10, .60, .50, .90)
    assert 0.5 < iou(a, b) < 0.7
    assert sorted(p["chunk"] for p in run({"k": [a, b]})[0]["k"]) == [0, 1]
    assert [p["chunk"] for p in run({"k": [a, b]}, nms_iou=0.5)[0]["k"]] == [1]


def test_a_box_removed_for_one_chunk_is_removed_for_all_and_greedy_order_holds():
    # A (chunk 0) wins; B overlaps A, so both of B's pairs go; C overlaps only B, which was removed: C stays
    pairs, _ = run({"k": [cand(0, 0, .10, .10, .50, .50, .9), cand(1, 1, .12, .10, .52, .50, .85),
                          cand(1, 2, .12, .10, .52, .50, .8), cand(2, 1, .16, .10, .56, .50, .7)]})
    assert iou(cand(1, 1, .12, .10, .52, .50, 0), cand(2, 1, .16, .10, .56, .50, 0)) > 0.7
    assert iou(cand(0, 0, .10, .10, .50, .50, 0), cand(2, 1, .16, .10, .56, .50, 0)) > 0.7
    assert [(p["chunk"], round(p["score"], 2)) for p in pairs["k"]] == [(0, 0.9)]
    sparse, _ = run({"k": [cand(0, 0, .10, .10, .40, .50, .9), cand(1, 1, .20, .10, .50, .50, .85),
                           cand(2, 2, .30, .10, .60, .50, .8)]}, nms_iou=0.3)
    assert [p["chunk"] for p in sparse["k"]] == [0, 2]  # 2 overlaps 0 by 0.2 and 1 (removed) by 0.5


def test_nms_iou_of_one_disables_nms():
    rows = {"k": [cand(0, 0, .1, .1, .5, .5, .9), cand(1, 1, .1, .1, .5, .5, .8)]}
    assert len(run(rows)[0]["k"]) == 1
    assert len(run(rows, nms_iou=1.0)[0]["k"]) == 2


def test_nms_is_per_image_not_across_rows():
    box = cand(0, 0, .1, .1, .5, .5, .9)
    pairs, _ = run({"a": [box], "b": [dict(box, score=.8)]})
    assert set(pairs) == {"a", "b"}


def published_grit_row() -> dict:
    return json.loads(GRIT_SAMPLES.read_text().splitlines()[0])


@pytest.mark.parametrize("scope", ["pair", "box", "chunk"])
def test_published_grit_row_keeps_both_boxes_at_the_default_iou(scope):
    row = published_grit_row()
    cands = [cand(i, i, *entry[2:6], entry[6]) for i, entry in enumerate(row["noun_chunks"])]
    assert 0.5 < iou(cands[0], cands[1]) < 0.69  # the release kept two boxes overlapping this much
    kept, _ = run({"k": cands}, nms_scope=scope)
    assert sorted((p["x1"], p["y1"], p["x2"], p["y2"]) for p in kept["k"]) == \
        sorted(tuple(e[2:6]) for e in row["noun_chunks"])
    strict, _ = run({"k": cands}, nms_scope=scope, nms_iou=0.5)
    assert len(strict["k"]) == (2 if scope == "chunk" else 1)  # class-agnostic at 0.5 would have lost one


# --- NMS: the other scopes -------------------------------------------------------------------------------

def test_box_scope_keeps_every_chunk_of_a_surviving_box():
    pairs, _ = run({"k": [cand(0, 0, .1, .1, .5, .5, .9), cand(0, 1, .1, .1, .5, .5, .7),
                          cand(1, 2, .12, .1, .5, .5, .8)]}, nms_scope="box")  # box 1 overlaps box 0
    assert [(p["chunk"], round(p["score"], 1)) for p in pairs["k"]] == [(0, 0.9), (1, 0.7)]
    paper, _ = run({"k": [cand(0, 0, .1, .1, .5, .5, .9), cand(0, 1, .1, .1, .5, .5, .7),
                          cand(1, 2, .12, .1, .5, .5, .8)]})
    assert [p["chunk"] for p in paper["k"]] == [0]


def test_box_scope_a_suppressed_box_loses_all_of_its_pairs():
    pairs, _ = run({"k": [cand(0, 0, .1, .1, .5, .5, .9), cand(1, 1, .11, .1, .5, .5, .85),
                          cand(1, 2, .11, .1, .5, .5, .8)]}, nms_scope="box")
    assert [p["chunk"] for p in pairs["k"]] == [0]


def test_chunk_scope_still_suppresses_within_a_chunk():
    pairs, _ = run({"k": [cand(0, 0, .1, .1, .5, .5, .9), cand(1, 0, .11, .1, .5, .5, .8),
                          cand(2, 1, .11, .1, .5, .5, .7)]}, nms_scope="chunk")
    assert [(p["chunk"], round(p["score"], 1)) for p in pairs["k"]] == [(0, 0.9), (1, 0.7)]


def test_the_old_scope_name_is_an_error_that_names_both_replacements():
    with pytest.raises(ValidationError, match="'pair'.*'box'"):
        SelectConfig(nms_scope="image")


# --- area and cap ----------------------------------------------------------------------------------------

def test_max_box_area_drops_big_boxes_before_nms():
    big = cand(0, 0, 0., 0., 1., 1., .95)
    small = cand(1, 1, .2, .2, .6, .6, .8)  # IoU 0.16 with the big box
    assert len(run({"k": [big, small]}, nms_iou=0.1)[0]["k"]) == 1  # the big box suppresses the small
    pairs, _ = run({"k": [big, small]}, nms_iou=0.1, max_box_area=0.5)
    assert [p["chunk"] for p in pairs["k"]] == [1]
    _, rejects = run({"k": [big]}, max_box_area=0.5)
    assert rejects["k"][0] == "no_box" and "max_box_area" in rejects["k"][1]


def test_max_pairs_keeps_the_highest_scores():
    cands = [cand(i, i % 2, .1 * i, 0., .1 * i + .05, .05, .7 + .02 * i) for i in range(5)]
    pairs, _ = run({"k": cands}, max_pairs=2)
    assert sorted(round(p["score"], 2) for p in pairs["k"]) == [0.76, 0.78]


# --- rejects and malformed candidates --------------------------------------------------------------------

def test_unassigned_only_and_empty_and_null_candidates():
    pairs, rejects = run({"unassigned": [cand(0, -1, .1, .1, .5, .5, .9)], "empty": [], "null": None,
                          "ok": [cand(0, 0, .1, .1, .5, .5, .9)]})
    assert set(pairs) == {"ok"}
    assert rejects["unassigned"] == ("no_box", "1 candidates: 1 unassigned (chunk -1)")
    assert rejects["empty"] == ("no_box", "no candidates")
    assert rejects["null"] == ("bad_detection", "candidates is null")


def test_a_null_candidate_entry_is_malformed_and_its_neighbours_kept():
    good = {"a": [cand(0, 0, .1, .1, .5, .5, .9), cand(1, 1, .6, .6, .9, .9, .8)], "c": [cand(0, 0, .1, .1, .5, .5, .9)]}
    pairs, rejects = run({"a": [good["a"][0], None, good["a"][1]], "b": [None], "c": good["c"]})
    assert (pairs, {}) == run(good)
    reason, detail = rejects["b"]
    assert reason == "bad_detection" and detail.startswith("all 1 candidates malformed (first: box -1 chunk -2: ")


@pytest.mark.parametrize("bad, problem", [
    (cand(0, 0, float("nan"), .1, .5, .5, .9), "non-finite corner"),
    (cand(0, 0, .1, .1, float("inf"), .5, .9), "non-finite corner"),
    (cand(0, 0, -.1, .1, .5, .5, .9), "corner outside [0, 1]"),
    (cand(0, 0, .1, .1, 1.2, .5, .9), "corner outside [0, 1]"),
    (cand(0, 0, .5, .1, .1, .5, .9), "inverted or empty box"),
    (cand(0, 0, .1, .3, .5, .3, .9), "inverted or empty box"),
    (cand(0, 0, .1, .1, .5, .5, float("nan")), "score not a number in [0, 1]"),
    (cand(0, 0, .1, .1, .5, .5, 1.5), "score not a number in [0, 1]"),
    (cand(-1, 0, .1, .1, .5, .5, .9), "negative box id"),
    (cand(0, -3, .1, .1, .5, .5, .9), "chunk index below -1"),
    (cand(0, 2, .1, .1, .5, .5, .9), "chunk index past the row's chunks"),
])
def test_malformed_candidates_are_dropped_and_an_all_malformed_row_is_bad_detection(bad, problem):
    good = cand(1, 0, .6, .6, .9, .9, .8)
    pairs, rejects = run({"all_bad": [bad], "mixed": [bad, good]}, n_chunks=2)
    assert rejects["all_bad"][0] == "bad_detection"
    assert problem in rejects["all_bad"][1]
    assert [(p["x1"], p["score"]) for p in pairs["mixed"]] == [(.6, pytest.approx(.8))]


def test_no_box_detail_counts_each_cause():
    _, rejects = run({"k": [cand(0, 0, float("nan"), 0, 1, 1, .9), cand(1, -1, .1, .1, .5, .5, .9),
                            cand(2, 0, .1, .1, .5, .5, .5)]})
    reason, detail = rejects["k"]
    assert reason == "no_box"
    assert detail == ("3 candidates: 1 malformed, 1 unassigned (chunk -1), "
                      "1 with score <= min_score 0.65 (best 0.5000)")


def test_config_rejects_bad_values():
    with pytest.raises(ValidationError):
        SelectConfig(min_score=1.5)
    with pytest.raises(ValidationError):
        SelectConfig(nms_iou=0)
    with pytest.raises(ValidationError):
        SelectConfig(min_scor=0.7)  # typo: unknown keys are errors


# --- order and determinism -------------------------------------------------------------------------------

def test_pairs_sorted_by_chunk_then_score_desc_then_coordinates():
    cands = [cand(0, 1, .0, .0, .1, .1, .7), cand(1, 0, .3, .3, .4, .4, .8), cand(2, 1, .5, .5, .6, .6, .9),
             cand(3, 0, .7, .7, .8, .8, .8), cand(4, 0, .2, .2, .25, .25, .8)]
    pairs, _ = run({"k": cands})
    assert [(p["chunk"], round(p["score"], 1), p["x1"]) for p in pairs["k"]] == \
        [(0, .8, .2), (0, .8, .3), (0, .8, .7), (1, .9, .5), (1, .7, .0)]


def test_equal_scores_resolve_the_same_way_whatever_the_input_order():
    a, b = cand(0, 0, .10, .10, .50, .50, .8), cand(1, 1, .12, .10, .52, .50, .8)
    first, _ = run({"k": [a, b]})
    second, _ = run({"k": [dict(b, box=0), dict(a, box=1)]})
    assert first == second
    assert [p["x1"] for p in first["k"]] == [.10]  # the tie goes to the smaller x1


def random_rows(n_rows: int, seed: int, max_cands: int = 12) -> dict[str, list[dict]]:
    rng = np.random.default_rng(seed)
    rows = {}
    for r in range(n_rows):
        cands = []
        for b in range(int(rng.integers(0, max_cands))):
            cx, cy, w, h = rng.uniform(.2, .8), rng.uniform(.2, .8), rng.uniform(.05, .5), rng.uniform(.05, .5)
            box = [max(cx - w / 2, 0), max(cy - h / 2, 0), min(cx + w / 2, 1), min(cy + h / 2, 1)]
            for chunk in rng.choice(np.arange(-1, 4), size=int(rng.integers(1, 3)), replace=False):
                cands.append(cand(b, int(chunk), *box, float(np.float32(rng.uniform(.4, 1.)))))
        rows[f"{r:05d}"] = cands
    return rows


def reference_pairs(cands: list[dict], cfg: SelectConfig) -> list[tuple]:
    """Straightforward per-image implementation of the documented rule, with torchvision's nms."""
    kept = [c for c in cands if c["chunk"] >= 0 and np.float32(c["score"]) > np.float32(cfg.min_score)]
    if cfg.nms_scope == "box":
        best: dict[int, dict] = {}
        for c in kept:
            if c["box"] not in best or c["score"] > best[c["box"]]["score"]:
                best[c["box"]] = c
        groups = {0: list(best.values())}
    elif cfg.nms_scope == "pair":
        groups = {0: kept}
    else:
        groups = {}
        for c in kept:
            groups.setdefault(c["chunk"], []).append(c)
    alive = set()
    for members in groups.values():
        if not members:
            continue
        boxes = torch.tensor([[m["x1"], m["y1"], m["x2"], m["y2"]] for m in members], dtype=torch.float64)
        scores = torch.tensor([m["score"] for m in members], dtype=torch.float64)
        for i in nms(boxes, scores, cfg.nms_iou).tolist():
            alive.add(members[i]["box"] if cfg.nms_scope == "box" else (members[i]["box"], members[i]["chunk"]))
    key = (lambda c: c["box"]) if cfg.nms_scope == "box" else (lambda c: (c["box"], c["chunk"]))
    out = [(c["chunk"], c["x1"], c["y1"], c["x2"], c["y2"], float(np.float32(c["score"])))
           for c in kept if key(c) in alive]
    return sorted(out, key=lambda p: (p[0], -p[5], p[1], p[2], p[3], p[4]))


@pytest.mark.parametrize("scope", ["pair", "box", "chunk"])
@pytest.mark.parametrize("nms_iou", [0.5, 0.7])
def test_batch_matches_a_per_image_reference(scope, nms_iou):
    rows = random_rows(400, seed=7)
    assert sum(len(c) for c in rows.values()) > 3 * NMS_BLOCK  # several NMS blocks
    cfg = SelectConfig(nms_scope=scope, nms_iou=nms_iou)
    pairs, rejects = run(rows, nms_scope=scope, nms_iou=nms_iou)
    for key, cands in rows.items():
        expected = reference_pairs(cands, cfg)
        got = [(p["chunk"], p["x1"], p["y1"], p["x2"], p["y2"], p["score"]) for p in pairs.get(key, [])]
        assert got == expected, key
        assert (key in rejects) == (not expected)


def test_shuffled_candidates_give_byte_identical_output():
    rows = random_rows(300, seed=3)
    shuffled = {}
    rng = random.Random(5)
    for key, cands in rows.items():
        cands = list(cands)
        rng.shuffle(cands)
        shuffled[key] = cands

    def parquet_bytes(rows):
        out = SelectStage().process_batch(batch(rows)).output
        buf = io.BytesIO()
        pq.write_table(out, buf)
        return buf.getvalue()

    assert parquet_bytes(rows) == parquet_bytes(shuffled)


def test_a_sliced_batch_gives_the_same_result_as_a_fresh_one():
    rows = random_rows(60, seed=11)
    full = batch(rows)
    sliced = full.slice(20, 25)
    fresh = batch(dict(list(rows.items())[20:45]))
    a, b = SelectStage().process_batch(sliced), SelectStage().process_batch(fresh)
    assert a.output.to_pylist() == b.output.to_pylist()
    assert a.rejects.to_pylist() == b.rejects.to_pylist()


def test_repeated_box_chunk_entries_give_one_pair_with_the_best_score():
    pairs, _ = run({"k": [cand(0, 0, .1, .1, .5, .5, .7), cand(0, 0, .1, .1, .5, .5, .9)]}, nms_iou=1.0)
    assert [round(p["score"], 1) for p in pairs["k"]] == [0.9]


# --- explain: what grit inspect shows -----------------------------------------------------------------------

def test_explain_gives_each_candidate_its_fate_and_names_the_nms_suppressor():
    cands = [cand(0, 0, .10, .10, .50, .50, .9),  # kept
             cand(0, 1, .10, .10, .50, .50, .8),  # same box, worse chunk: removed by (0, 0)
             cand(1, 2, .12, .10, .52, .50, .85),  # overlaps box 0: removed by (0, 0)
             cand(2, 1, .60, .60, .90, .90, .5),  # below min_score
             cand(3, -1, .60, .10, .90, .40, .9),  # unassigned
             cand(4, 0, float("nan"), .1, .5, .5, .9),  # malformed
             cand(0, 0, .10, .10, .50, .50, .7)]  # repeat of (0, 0) with a worse score
    table = batch({"k": cands, "empty": []})
    stage = SelectStage()
    fates = stage.explain(table)
    assert [f.status for f in fates[0]] == ["kept", "nms", "nms", "below_min_score", "unassigned", "malformed",
                                           "duplicate"]
    assert fates[1] == []
    assert (fates[0][1].by_box, fates[0][1].by_chunk, fates[0][1].iou) == (0, 0, 1.0)
    assert (fates[0][2].by_box, fates[0][2].by_chunk) == (0, 0) and fates[0][2].iou > 0.7
    assert fates[0][5].detail == "non-finite corner"
    kept = stage.process_batch(table).output.to_pylist()[0]["pairs"]
    assert [(p["chunk"], round(p["score"], 1)) for p in kept] == [(0, 0.9)]


@pytest.mark.parametrize("scope", ["pair", "box", "chunk"])
def test_explain_agrees_with_the_output_under_every_scope(scope):
    rows = random_rows(80, seed=5)
    stage = SelectStage(SelectConfig(nms_scope=scope, nms_iou=0.4, max_pairs=3))
    table = batch(rows)
    out = {r["key"]: r["pairs"] for r in stage.process_batch(table).output.to_pylist()}
    for (key, cands), fates in zip(rows.items(), stage.explain(table), strict=True):
        kept = sorted((c["chunk"], c["x1"], c["y1"]) for c, f in zip(cands, fates, strict=True) if f.status == "kept")
        assert kept == sorted((p["chunk"], p["x1"], p["y1"]) for p in out.get(key, [])), key
        for c, f in zip(cands, fates, strict=True):
            if f.status == "nms":
                assert f.iou > stage.config.nms_iou and (scope != "chunk" or f.by_chunk == c["chunk"])
    statuses = {f.status for fates in stage.explain(table) for f in fates}
    assert {"kept", "nms", "below_min_score", "unassigned", "max_pairs"} <= statuses
