"""`make demo` end to end (`grit_pipeline.demo.run_demo` on local Ray): the demo's GrIT shards validate, and
its grounded captions carry the hand-annotated phrases with their location tokens.

Expectations come from `grit_pipeline/assets/demo/annotations.yaml` (boxes placed by eye, the expected
tagged expression of each phrase, the expected reject of each bad row), not from a previous run.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import re

import pyarrow.parquet as pq
import pytest

from grit_pipeline.assets.build_demo_sample import load_annotations, phrase_span
from grit_pipeline.demo import run_demo
from schemas.grounded_text import parse_grounded_caption
from schemas.location import encode_box, location_tokens

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROWS = load_annotations()


def _tokens(box) -> str:
    return location_tokens(*encode_box(box, "unilm"))


def _final_rows(grit_dir) -> dict[str, dict]:
    rows = {}
    for path in sorted(grit_dir.glob("shard-*.parquet")):
        for r in pq.read_table(path).to_pylist():
            rows[r["key"]] = r
    return rows


def _rejects(run_dir) -> dict[str, tuple[str, str]]:
    """key -> (stage, reason) over every stage's committed rejects."""
    out = {}
    for path in sorted(run_dir.glob("stages/*/*/shard-*.rejects.parquet")):
        for r in pq.read_table(path).to_pylist():
            out[r["key"]] = (r["stage"], r["reason"])
    return out


@pytest.fixture(scope="module")
def demo(ray_local, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo") / "demo-run"
    return run_demo(run_dir, progress=False)


def test_demo_shards_validate_and_rejects_are_the_planted_ones(demo):
    assert demo.ok, demo.problems
    final = _final_rows(demo.grit_dir)
    grounded = {r.key for r in ROWS if r.expect_reject is None}
    assert set(final) == grounded
    rejects = _rejects(demo.run_dir)
    for row in ROWS:
        if row.expect_reject is not None:
            assert rejects[row.key] == (row.expect_reject["stage"], row.expect_reject["reason"]), row.caption
    if demo.report_index is not None:
        assert demo.report_index.exists()
    # Passthrough columns of the source reach the GrIT shards.
    table = pq.read_table(sorted(demo.grit_dir.glob("shard-*.parquet"))[0])
    assert {"scene", "license"} <= set(table.column_names)


def test_demo_grounded_captions_carry_the_annotated_phrases_and_boxes(demo):
    final = _final_rows(demo.grit_dir)
    checked = 0
    for row in ROWS:
        if row.expect_reject is not None:
            continue
        out = final[row.key]
        assert out["caption"] == row.caption
        parsed = parse_grounded_caption(out["grounded_caption"])
        tagged = {row.caption[s.start:s.end]: set(s.boxes) for s in parsed.spans}
        entries = {(int(e[0]), int(e[1]), *e[2:6]) for e in out["noun_chunks"]}
        for phrase in row.phrases:
            start, end = phrase_span(row.caption, phrase["text"])
            for box in phrase["boxes"]:
                # the noun chunk keeps the annotated box exactly
                assert (start, end, *box) in entries, (row.key, phrase["text"], box)
            expression = phrase["expression"]
            if expression is None:  # contained in a longer expression: not tagged on its own
                assert phrase["text"] not in tagged, (row.key, phrase["text"])
                continue
            # `<phrase> an astronaut in an orange suit</phrase><object><patch_index_0001>...</object>`
            m = re.search(rf"<phrase>\s?{re.escape(expression)}</phrase><object>(.*?)</object>",
                          out["grounded_caption"])
            assert m, (row.key, expression, out["grounded_caption"])
            for box in phrase["boxes"]:
                assert _tokens(box) in m.group(1), (row.key, expression, box)
                assert encode_box(box, "unilm") in tagged[expression]
            md = f"[{expression}]("
            assert md in out["markdown_caption"]
            checked += 1
        for extra in row.distractors:  # weak or NMS-suppressed boxes never make it
            start, end = phrase_span(row.caption, extra["text"])
            assert (start, end, *extra["box"]) not in entries
    assert checked >= 12


def test_demo_regenerates_with_a_new_threshold(demo):
    """Re-running with select.min_score=0.85 keeps exactly the rows with an annotated box above 0.85."""
    again = run_demo(demo.run_dir, ["select.min_score=0.85"], report=False, progress=False)
    assert again.ok, again.problems
    final = _final_rows(again.grit_dir)
    expected = {r.key for r in ROWS if r.expect_reject is None and any(p["score"] > 0.85 for p in r.phrases)}
    assert set(final) == expected
    for key, out in final.items():
        assert all(e[6] > 0.85 for e in out["noun_chunks"]), key
    # ingest, chunks and detect were reused: each stage still has a single fingerprint folder
    for stage in ("ingest", "chunks", "detect"):
        assert len(list((demo.run_dir / "stages" / stage).iterdir())) == 1
    assert len(list((demo.run_dir / "stages" / "select").iterdir())) == 2
