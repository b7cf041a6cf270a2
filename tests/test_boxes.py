"""The one box check (`schemas.boxes`): what it flags, and that every checker of the pipeline -- the replay
detector, select, compose, the row model behind `grit validate` -- accepts and refuses exactly the same
boxes, with the same single tolerance."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from schemas.boxes import BOX_PROBLEMS, BOX_TOLERANCE, check_boxes
from schemas.rows import SpanBox
from schemas.tables import CANDIDATE_TYPE, CHUNK_TYPE, INGEST_FIELDS, PAIR_TYPE
from stages.compose import ComposeStage
from stages.detectors.replay import check_entries
from stages.select import SelectConfig, SelectStage

NAN, INF = float("nan"), float("inf")


def test_each_problem_is_flagged_and_named():
    boxes = [(0.1, 0.1, 0.5, 0.5), (NAN, 0.1, 0.5, 0.5), (0.1, 0.1, INF, 0.5), (-0.2, 0.1, 0.5, 0.5),
             (0.6, 0.1, 0.5, 0.5), (0.5, 0.1, 0.5, 0.5), (0.1, 0.1, 0.5, 0.5), (0.1, 0.1, 0.5, 0.5)]
    scores = [0.9, 0.9, 0.9, 0.9, 0.9, 0.9, NAN, 1.5]
    check = check_boxes(boxes, scores)
    assert check.ok.tolist() == [True] + [False] * 7
    first_problem = [next((name for name, mask in check.problems.items() if mask[i]), None) for i in range(8)]
    assert first_problem == [
        None, "non_finite", "non_finite", "box_out_of_range", "box_inverted", "box_inverted",
        "score_out_of_range", "score_out_of_range"]
    assert check.describe(0) == "" and all(check.describe(i).startswith(BOX_PROBLEMS[first_problem[i]])
                                            for i in range(1, 8))
    assert check.describe(4) == BOX_PROBLEMS["box_inverted"]
    assert list(check.problems) == list(BOX_PROBLEMS)


def test_corners_within_the_tolerance_are_clipped_and_farther_ones_refused():
    check = check_boxes([(-BOX_TOLERANCE / 2, 0.0, 1 + BOX_TOLERANCE / 2, 0.5),
                         (0.0, 0.0, 1 + 2 * BOX_TOLERANCE, 0.5)])
    assert check.ok.tolist() == [True, False]
    assert check.clipped[0].tolist() == [0.0, 0.0, 1.0, 0.5]
    # clipping can empty a box: then it is inverted, not accepted
    assert check_boxes([(1.0, 0.0, 1 + BOX_TOLERANCE / 2, 0.5)]).describe(0) == BOX_PROBLEMS["box_inverted"]


def test_a_box_without_scores_is_checked_without_the_score_problem():
    check = check_boxes(np.array([[0.1, 0.2, 0.3, 0.4]]))
    assert "score_out_of_range" not in check.problems and check.ok.tolist() == [True]


# --- every checker agrees ----------------------------------------------------------------------------------

EDGE_CASES = [
    ((0.1, 0.1, 0.5, 0.5), 0.9),
    ((-BOX_TOLERANCE / 2, 0.0, 1 + BOX_TOLERANCE / 2, 0.5), 0.9),  # float noise: clipped, kept
    ((0.0, 0.0, 1 + 2 * BOX_TOLERANCE, 0.5), 0.9),  # just past the tolerance
    ((-2 * BOX_TOLERANCE, 0.0, 0.5, 0.5), 0.9),
    ((0.5, 0.1, 0.5, 0.5), 0.9),  # empty
    ((1.0, 0.0, 1 + BOX_TOLERANCE / 2, 0.5), 0.9),  # empty once clipped
    ((NAN, 0.1, 0.5, 0.5), 0.9),
    ((0.1, 0.1, 0.5, 0.5), 1.5),
    ((0.1, 0.1, 0.5, 0.5), -0.1),
]


def _replay(box, score):
    keep, clipped, _ = check_entries(np.array([box]), np.array([score]), np.array([0]), 1)
    return tuple(clipped[0]) if keep[0] else None


def _select(box, score):
    cand = {"box": 0, "chunk": 0, "x1": box[0], "y1": box[1], "x2": box[2], "y2": box[3], "score": score,
            "box_score": score}
    table = pa.table({"key": ["k"], "candidates": pa.array([[cand]], pa.list_(CANDIDATE_TYPE))})
    out = SelectStage(SelectConfig(min_score=0.0)).process_batch(table).output.to_pylist()
    if not out:
        return None
    p = out[0]["pairs"][0]
    return (p["x1"], p["y1"], p["x2"], p["y2"])


_COMPOSE_SCHEMA = pa.schema([*INGEST_FIELDS, pa.field("chunks", pa.list_(CHUNK_TYPE)),
                             pa.field("pairs", pa.list_(PAIR_TYPE))])


def _compose_input(box, score):
    chunk = {"start": 0, "end": 5, "root_start": 0, "root_end": 5, "expr_start": 0, "expr_end": 5,
             "has_conj": False}
    pair = {"chunk": 0, "x1": box[0], "y1": box[1], "x2": box[2], "y2": box[3], "score": score}
    return {"key": "k", "shard": 0, "url": None, "caption": "a dog", "width": 10, "height": 10,
            "image_ref": None, "chunks": [chunk], "pairs": [pair]}


def _compose(box, score):
    row = _compose_input(box, score)
    out = ComposeStage().process_batch(pa.Table.from_pylist([row], schema=_COMPOSE_SCHEMA)).output.to_pylist()
    return tuple(out[0]["noun_chunks"][0][2:6]) if out else None


def _span_box(box, score):
    try:
        b = SpanBox.from_list([0, 5, *box, score])
    except ValidationError:
        return None
    return (b.x1, b.y1, b.x2, b.y2)


@pytest.mark.parametrize("box, score", EDGE_CASES)
def test_every_checker_accepts_and_clips_the_same_boxes(box, score):
    check = check_boxes([box], [score])
    expected = tuple(check.clipped[0].tolist()) if check.ok[0] else None
    got = {"replay": _replay(box, score), "select": _select(box, score), "compose": _compose(box, score),
           "SpanBox": _span_box(box, score)}
    assert got == dict.fromkeys(got, expected)


def test_the_edge_cases_cover_both_outcomes():
    ok = check_boxes([b for b, _ in EDGE_CASES], [s for _, s in EDGE_CASES]).ok
    assert ok.sum() == 2 and (~ok).sum() == len(EDGE_CASES) - 2


def test_grit_validate_checks_a_table_at_once_and_refuses_the_same_boxes_as_the_row_model():
    from grit_pipeline.commands.validate import check_row, validate_table
    from schemas.tables import GRIT_SCHEMA

    base = ComposeStage().process_batch(pa.Table.from_pylist([_compose_input((0.1, 0.1, 0.5, 0.5), 0.9)],
                                                             schema=_COMPOSE_SCHEMA)).output.to_pylist()[0]
    # entries inside [0, 1] or refused (validate encodes an accepted entry's corners as given, unclipped)
    cases = [(box, score) for box, score in EDGE_CASES
             if all(0.0 <= v <= 1.0 for v in box) or not check_boxes([box], [score]).ok[0]]
    rows = [{**base, "key": f"k{i}", "noun_chunks": [[0.0, 5.0, *box, score]], "ref_exps": [[0.0, 5.0, *box, score]]}
            for i, (box, score) in enumerate(cases)]
    problems = validate_table(pa.Table.from_pylist(rows, schema=GRIT_SCHEMA))
    got = {row["key"]: [p.message for p in problems if p.key == row["key"]] for row in rows}
    assert got == {row["key"]: check_row(row) for row in rows}  # the row model, box by box
    assert [bool(m) for m in got.values()] == [not check_boxes([b], [s]).ok[0] for b, s in cases]
    assert sum(not m for m in got.values()) == 1 and len(cases) == len(EDGE_CASES) - 1


def test_grit_validate_accepts_a_corner_outside_by_less_than_the_tolerance():
    """A shard written elsewhere may hold -5e-7 for 0: float noise within BOX_TOLERANCE, encoded as clipped."""
    from grit_pipeline.commands.validate import validate_table
    from schemas.tables import GRIT_SCHEMA

    row = ComposeStage().process_batch(pa.Table.from_pylist([_compose_input((0.0, 0.1, 0.5, 1.0), 0.9)],
                                                            schema=_COMPOSE_SCHEMA)).output.to_pylist()[0]
    noisy = {col: [[e[0], e[1], -5e-7, e[3], e[4], 1.0 + 5e-7, e[6]] for e in row[col]]
             for col in ("noun_chunks", "ref_exps")}
    assert validate_table(pa.Table.from_pylist([{**row, **noisy}], schema=GRIT_SCHEMA)) == []
