"""The compose stage: GRIT columns, the paper's containment filter, the published GRIT row, grounded
captions, bad input rejected with specific reasons while neighbours are kept."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pytest

from schemas.boxes import BOX_TOLERANCE
from schemas.grounded_text import GroundedSpan, parse_grounded_caption, parse_markdown_caption
from schemas.location import encode_box, location_tokens
from schemas.rows import GritRow
from schemas.tables import CANDIDATE_TYPE, CHUNK_TYPE, GRIT_COLUMNS, GRIT_SCHEMA, INGEST_FIELDS, PAIR_TYPE
from stages.compose import ComposeConfig, ComposeStage
from stages.registry import stage_class

EVAL = Path(__file__).resolve().parent / "data"
PUBLISHED = next(json.loads(line) for line in (EVAL / "grit_published_samples.jsonl").read_text().splitlines()
                 if json.loads(line)["format"] == "grit_native")


def chunk(start, end, expr_start=None, expr_end=None, has_conj=False):
    return {"start": start, "end": end, "root_start": start, "root_end": end,
            "expr_start": start if expr_start is None else expr_start,
            "expr_end": end if expr_end is None else expr_end, "has_conj": has_conj}


def pair(c, box, score):
    x1, y1, x2, y2 = box
    return {"chunk": c, "x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": score}


def make_table(rows: list[dict]) -> pa.Table:
    """A compose input batch: ingest columns, passthrough source columns (`id`, `clip_similarity_vitb32`, a
    `src_` column that must not pass), then the chunks/detect/select outputs."""
    fields = list(INGEST_FIELDS) + [
        pa.field("id", pa.int64()),
        pa.field("src_noun_chunks", pa.list_(pa.list_(pa.float64()))),
        pa.field("clip_similarity_vitb32", pa.float64()),
        pa.field("chunks", pa.list_(CHUNK_TYPE), nullable=False),
        pa.field("candidates", pa.list_(CANDIDATE_TYPE), nullable=False),
        pa.field("pairs", pa.list_(PAIR_TYPE), nullable=False),
    ]
    defaults = {"shard": 0, "url": "http://x/img.jpg", "width": 640, "height": 480, "image_ref": None,
                "src_noun_chunks": None, "clip_similarity_vitb32": 0.3, "candidates": []}
    data = {f.name: [r.get(f.name, defaults.get(f.name)) for r in rows] for f in fields}
    data["id"] = [r.get("id", i) for i, r in enumerate(rows)]
    return pa.table(data, schema=pa.schema(fields))


def run(rows, **config):
    result = ComposeStage(ComposeConfig(**config)).process_batch(make_table(rows))
    return result.output, result.rejects


# --- the paper's example ---------------------------------------------------------------------------------

DOG_BOX, FIELD_BOX, FLOWERS_BOX = (0.1, 0.2, 0.5, 0.9), (0.0, 0.5, 1.0, 1.0), (0.3, 0.6, 0.7, 0.95)
PAPER = {
    "key": "paper",
    "caption": "a dog in a field of flowers",
    # a dog / a field / flowers, expanded to their dependency subtrees 0-27, 9-27, 20-27
    "chunks": [chunk(0, 5, 0, 27), chunk(9, 16, 9, 27), chunk(20, 27, 20, 27)],
    # the contained expressions score higher: containment, not score, decides what is tagged
    "pairs": [pair(0, DOG_BOX, 0.70), pair(1, FIELD_BOX, 0.80), pair(2, FLOWERS_BOX, 0.90)],
}


def test_paper_example_keeps_the_single_containing_expression():
    out, rejects = run([PAPER])
    assert rejects.num_rows == 0
    row = out.to_pylist()[0]
    # floor(0.1*32)=3, floor(0.2*32)=6 -> 6*32+3 = 195; floor(0.5*32)=16, floor(0.9*32)=28 -> 28*32+16 = 912
    assert row["grounded_caption"] == (
        "<grounding><phrase> a dog in a field of flowers</phrase><object><patch_index_0195><patch_index_0912>"
        "</object>")
    assert row["markdown_caption"] == "[a dog in a field of flowers](<patch_index_0195><patch_index_0912>)"
    assert parse_grounded_caption(row["grounded_caption"]).spans == (GroundedSpan(0, 27, ((195, 912),)),)
    # noun_chunks / ref_exps: every pair, score descending, aligned 1:1
    assert [e[:2] for e in row["noun_chunks"]] == [[20, 27], [9, 16], [0, 5]]
    assert [e[:2] for e in row["ref_exps"]] == [[20, 27], [9, 27], [0, 27]]
    assert [e[2:6] for e in row["noun_chunks"]] == [list(FLOWERS_BOX), list(FIELD_BOX), list(DOG_BOX)]
    assert [e[2:] for e in row["noun_chunks"]] == [e[2:] for e in row["ref_exps"]]
    assert [e[6] for e in row["noun_chunks"]] == pytest.approx([0.9, 0.8, 0.7], abs=1e-6)
    GritRow.model_validate(row)


def test_filter_off_tags_the_noun_chunks():
    out, _ = run([PAPER], containment_filter=False)
    row = out.to_pylist()[0]
    parsed = parse_grounded_caption(row["grounded_caption"])
    assert parsed.caption == PAPER["caption"]
    assert parsed.spans == (GroundedSpan(0, 5, (encode_box(DOG_BOX),)), GroundedSpan(9, 16, (encode_box(FIELD_BOX),)),
                            GroundedSpan(20, 27, (encode_box(FLOWERS_BOX),)))
    assert row["grounded_caption"].startswith("<grounding><phrase> a dog</phrase><object>")
    assert " in<phrase> a field</phrase>" in row["grounded_caption"]
    assert parse_markdown_caption(row["markdown_caption"]) == parsed
    # The GRIT columns do not depend on the filter.
    assert row["noun_chunks"] == run([PAPER])[0].to_pylist()[0]["noun_chunks"]


# --- the published GRIT-20M row --------------------------------------------------------------------------


def test_published_grit_row():
    rec = PUBLISHED
    rows = [{
        "key": rec["key"], "url": rec["url"], "caption": rec["caption"], "width": rec["width"],
        "height": rec["height"], "id": rec["id"], "clip_similarity_vitb32": rec["clip_similarity_vitb32"],
        "src_noun_chunks": rec["noun_chunks"],
        # chunks listed in caption order (as the chunks stage writes them), pairs in reverse score order
        "chunks": [chunk(n[0], n[1], r[0], r[1]) for n, r in sorted(zip(rec["noun_chunks"], rec["ref_exps"], strict=True))],
        "pairs": [pair(0, rec["noun_chunks"][1][2:6], rec["noun_chunks"][1][6]),
                  pair(1, rec["noun_chunks"][0][2:6], rec["noun_chunks"][0][6])],
    }]
    out, rejects = run(rows)
    assert rejects.num_rows == 0
    row = out.to_pylist()[0]
    for name in ("noun_chunks", "ref_exps"):
        assert [e[:6] for e in row[name]] == [e[:6] for e in rec[name]]  # same order: score descending
        assert [e[6] for e in row[name]] == pytest.approx([e[6] for e in rec[name]], abs=1e-6)
        assert [rec["caption"][int(e[0]):int(e[1])] for e in row[name]] == rec["derived_text"][name]
    assert [location_tokens(*encode_box(e[2:6])) for e in row["noun_chunks"]] == [
        "<patch_index_0288><patch_index_0990>", "<patch_index_0000><patch_index_1022>"]
    # "a paper cover that reads ..." (19-66) lies inside "a wire hanger with ..." (0-66): one phrase
    assert row["grounded_caption"] == (
        "<grounding><phrase> a wire hanger with a paper cover that reads we heart our customers</phrase>"
        "<object><patch_index_0000><patch_index_1022></object>")
    assert row["markdown_caption"] == (
        "[a wire hanger with a paper cover that reads we heart our customers]"
        "(<patch_index_0000><patch_index_1022>)")
    assert (row["key"], row["url"], row["width"], row["height"], row["id"]) == (
        rec["key"], rec["url"], rec["width"], rec["height"], rec["id"])
    assert list(out.column_names) == [*GRIT_COLUMNS, "id", "clip_similarity_vitb32"]
    GritRow.model_validate(row)


# --- phrase grouping, crossing spans, ordering -----------------------------------------------------------


def test_identical_expressions_become_one_phrase_with_several_boxes():
    a, b, c = (0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 0.9, 0.9), (0.2, 0.2, 0.3, 0.3)
    row = {"key": "k", "caption": "two dogs and a cat play",
           # "two dogs" and "a cat" are conjuncts: unexpanded; two boxes for the dogs, in ascending score order
           "chunks": [chunk(0, 8, has_conj=True), chunk(13, 18, has_conj=True)],
           "pairs": [pair(0, a, 0.7), pair(1, c, 0.8), pair(0, b, 0.9)]}
    out, _ = run([row])
    got = out.to_pylist()[0]
    assert parse_grounded_caption(got["grounded_caption"]).spans == (
        GroundedSpan(0, 8, (encode_box(b), encode_box(a))), GroundedSpan(13, 18, (encode_box(c),)))
    assert "</delimiter_of_multi_objects/>" in got["grounded_caption"]
    assert "<grounding><phrase> two dogs</phrase><object>" + location_tokens(*encode_box(b)) + (
        "</delimiter_of_multi_objects/>") in got["grounded_caption"]
    assert [e[6] for e in got["noun_chunks"]] == pytest.approx([0.9, 0.8, 0.7], abs=1e-6)


def test_crossing_expressions_keep_the_higher_score():
    caption = "red apples on green plates"
    # expressions [0, 19) and [11, 26) cross; the second scores higher
    chunks = [chunk(0, 10, 0, 19), chunk(14, 26, 11, 26)]
    box = (0.1, 0.1, 0.2, 0.2)
    out, _ = run([{"key": "k", "caption": caption, "chunks": chunks,
                   "pairs": [pair(0, box, 0.7), pair(1, box, 0.9)]}])
    assert [(s.start, s.end) for s in parse_grounded_caption(out.column("grounded_caption")[0].as_py()).spans] == [
        (11, 26)]
    # equal scores: the earlier span wins, whatever the pair order
    for pairs in ([pair(0, box, 0.8), pair(1, box, 0.8)], [pair(1, box, 0.8), pair(0, box, 0.8)]):
        out, _ = run([{"key": "k", "caption": caption, "chunks": chunks, "pairs": pairs}])
        assert [(s.start, s.end) for s in parse_grounded_caption(out.column("grounded_caption")[0].as_py()).spans
                ] == [(0, 19)]


def test_ties_and_pair_order_do_not_change_the_output():
    boxes = [(0.1, 0.1, 0.4, 0.4), (0.2, 0.1, 0.4, 0.4), (0.5, 0.5, 0.6, 0.6)]
    pairs = [pair(c, b, 0.75) for c in range(3) for b in boxes]
    base = {"key": "k", "caption": PAPER["caption"], "chunks": PAPER["chunks"]}
    first = run([{**base, "pairs": pairs}])[0]
    rng = random.Random(0)
    for _ in range(5):
        shuffled = pairs[:]
        rng.shuffle(shuffled)
        assert run([{**base, "pairs": shuffled}])[0].equals(first)


def test_location_encoder_is_configurable():
    edge = (0.0, 0.0, 0.5, 0.5)
    row = {"key": "k", "caption": "a cat", "chunks": [chunk(0, 5)], "pairs": [pair(0, edge, 0.9)]}
    unilm = run([row])[0].column("markdown_caption")[0].as_py()
    hf = run([row], location_encoder="hf")[0].column("markdown_caption")[0].as_py()
    assert unilm == f"[a cat]({location_tokens(0, 16 * 32 + 16)})"
    assert hf == f"[a cat]({location_tokens(0, 15 * 32 + 15)})"


def test_brackets_are_escaped_in_markdown_and_kept_in_kosmos():
    row = {"key": "k", "caption": "[sale] a red bag (new) > old", "chunks": [chunk(7, 16)],
           "pairs": [pair(0, (0.1, 0.1, 0.9, 0.9), 0.9)]}
    got = run([row])[0].to_pylist()[0]
    assert got["markdown_caption"] == "\\[sale\\] [a red bag](<patch_index_0099><patch_index_0924>) (new) > old"
    assert got["grounded_caption"] == ("<grounding> [sale]<phrase> a red bag</phrase>"
                                       "<object><patch_index_0099><patch_index_0924></object> (new) > old")


# --- bad input: specific reasons, neighbours kept --------------------------------------------------------

NAN, INF = float("nan"), float("inf")
GOOD = {"caption": "a dog on a sofa", "chunks": [chunk(0, 5, 0, 15), chunk(9, 15)]}
BAD_ROWS = [
    ("nan_box", {**GOOD, "pairs": [pair(0, (NAN, 0.1, 0.5, 0.5), 0.9)]}, "bad_detection"),
    ("inf_box", {**GOOD, "pairs": [pair(0, (0.1, 0.1, INF, 0.5), 0.9)]}, "bad_detection"),
    ("out_of_range", {**GOOD, "pairs": [pair(0, (0.1, 0.1, 1.5, 0.5), 0.9)]}, "bad_detection"),
    ("negative", {**GOOD, "pairs": [pair(0, (-0.2, 0.1, 0.5, 0.5), 0.9)]}, "bad_detection"),
    ("inverted", {**GOOD, "pairs": [pair(1, (0.6, 0.1, 0.5, 0.5), 0.9)]}, "bad_detection"),
    ("empty_box", {**GOOD, "pairs": [pair(1, (0.5, 0.1, 0.5, 0.5), 0.9)]}, "bad_detection"),
    ("nan_score", {**GOOD, "pairs": [pair(0, (0.1, 0.1, 0.5, 0.5), NAN)]}, "bad_detection"),
    ("chunk_index", {**GOOD, "pairs": [pair(2, (0.1, 0.1, 0.5, 0.5), 0.9)]}, "bad_detection"),
    ("chunk_outside", {**GOOD, "chunks": [chunk(0, 40)], "pairs": [pair(0, (0.1, 0.1, 0.5, 0.5), 0.9)]},
     "bad_chunk"),
    ("expr_not_containing", {**GOOD, "chunks": [chunk(0, 5, 2, 15)], "pairs": [pair(0, (0.1, 0.1, 0.5, 0.5), 0.9)]},
     "bad_chunk"),
    ("tag_caption", {"caption": "<phrase>a dog</phrase> on a sofa", "chunks": [chunk(8, 13)],
                     "pairs": [pair(0, (0.1, 0.1, 0.5, 0.5), 0.9)]}, "unsafe_caption"),
    ("patch_caption", {"caption": "a dog <patch_index_0001>", "chunks": [chunk(0, 5)],
                       "pairs": [pair(0, (0.1, 0.1, 0.5, 0.5), 0.9)]}, "unsafe_caption"),
    ("leading_space", {"caption": " a dog", "chunks": [chunk(1, 6)],
                       "pairs": [pair(0, (0.1, 0.1, 0.5, 0.5), 0.9)]}, "unsafe_caption"),
    ("no_pairs", {**GOOD, "pairs": []}, "no_box"),
]


def test_bad_rows_are_rejected_with_specific_reasons_and_neighbours_kept():
    rows = []
    for i, (name, bad, _) in enumerate(BAD_ROWS):
        rows.append({**GOOD, "key": f"good{i}", "id": 1000 + i, "pairs": [pair(1, (0.2, 0.2, 0.6, 0.6), 0.8)]})
        rows.append({**bad, "key": name, "id": i})
    out, rejects = run(rows)
    assert rejects.to_pylist() == [
        {"key": name, "stage": "compose", "reason": reason, "detail": rejects.column("detail")[i].as_py()}
        for i, (name, _, reason) in enumerate(BAD_ROWS)]
    assert all(rejects.column("detail").to_pylist())
    assert out.column("key").to_pylist() == [f"good{i}" for i in range(len(BAD_ROWS))]
    assert out.column("id").to_pylist() == [1000 + i for i in range(len(BAD_ROWS))]
    assert out.num_rows + rejects.num_rows == len(rows)


def test_long_emoji_rtl_and_empty_captions():
    long_caption = "word " * 999 + "a cat"  # 5,000 characters
    rtl = "🐶 כלב על ספה and a cat 👩‍👩‍👧"
    rows = [
        {"key": "long", "caption": long_caption, "chunks": [chunk(4995, 5000)], "pairs": [pair(0, DOG_BOX, 0.9)]},
        {"key": "rtl", "caption": rtl, "chunks": [chunk(0, 1), chunk(2, 5), chunk(17, 22)],
         "pairs": [pair(0, DOG_BOX, 0.9), pair(1, FIELD_BOX, 0.8), pair(2, FLOWERS_BOX, 0.7)]},
        {"key": "empty", "caption": "", "chunks": [], "pairs": [pair(0, DOG_BOX, 0.9)]},
    ]
    out, rejects = run(rows)
    assert len(long_caption) == 5000
    assert rejects.to_pylist() == [{"key": "empty", "stage": "compose", "reason": "empty_caption",
                                    "detail": "caption is empty or null"}]
    got = {r["key"]: r for r in out.to_pylist()}
    assert got["long"]["grounded_caption"].endswith(" word<phrase> a cat</phrase><object>"
                                                    + location_tokens(*encode_box(DOG_BOX)) + "</object>")
    parsed = parse_grounded_caption(got["rtl"]["grounded_caption"])
    assert parsed.caption == rtl
    assert [rtl[s.start:s.end] for s in parsed.spans] == ["🐶", "כלב", "a cat"]
    assert parse_markdown_caption(got["rtl"]["markdown_caption"]) == parsed


def test_box_within_tolerance_is_clipped():
    row = {**GOOD, "key": "k", "pairs": [pair(1, (-1e-9, 0.0, 1.0 + 1e-9, 0.5), 0.8)]}
    out, rejects = run([row])
    assert rejects.num_rows == 0
    assert out.column("noun_chunks")[0].as_py()[0][2:6] == [0.0, 0.0, 1.0, 0.5]
    beyond = {**row, "pairs": [pair(1, (0.0, 0.0, 1.0 + 2 * BOX_TOLERANCE, 0.5), 0.8)]}
    out, rejects = run([beyond])
    assert rejects.column("reason").to_pylist() == ["bad_detection"]
    assert "corner outside [0, 1]" in rejects.column("detail")[0].as_py()


# --- schema, determinism, config -------------------------------------------------------------------------


def test_output_schema_and_column_order():
    out, _ = run([{**PAPER}, {**GOOD, "key": "g", "pairs": [pair(0, DOG_BOX, 0.9)]}])
    assert out.schema.names == [*GRIT_COLUMNS, "id", "clip_similarity_vitb32"]
    for f in GRIT_SCHEMA:
        assert out.schema.field(f.name).equals(f)
    assert ComposeStage.output_schema.equals(GRIT_SCHEMA)
    for row in out.to_pylist():
        GritRow.model_validate(row)
        assert parse_grounded_caption(row["grounded_caption"]).caption == row["caption"]


def test_empty_batch():
    out, rejects = run([])
    assert out.num_rows == 0 and rejects.num_rows == 0
    assert out.schema.names == [*GRIT_COLUMNS, "id", "clip_similarity_vitb32"]


def test_same_input_same_bytes(tmp_path):
    import pyarrow.parquet as pq

    rows = [PAPER, {**GOOD, "key": "g", "pairs": [pair(0, DOG_BOX, 0.9), pair(1, FIELD_BOX, 0.9)]}]
    for name in ("a", "b"):
        pq.write_table(run(rows)[0], tmp_path / f"{name}.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_config_and_registry():
    assert stage_class("compose") is ComposeStage
    assert ComposeStage.name == "compose" and ComposeStage.version == 2
    assert all(f.description for f in ComposeConfig.model_fields.values())
    cfg = ComposeConfig()
    assert cfg.containment_filter is True and cfg.location_encoder == "unilm"
    with pytest.raises(ValueError):
        ComposeConfig(location_encoder="glip")
    with pytest.raises(ValueError):
        ComposeConfig(containment_filtr=False)
    assert "box_tolerance" not in ComposeConfig.model_fields  # one tolerance for every checker: schemas.boxes


def test_null_pair_or_chunk_entries_reject_only_their_row():
    good = [{**PAPER, "key": "paper", "id": 1},
            {**GOOD, "key": "sofa", "id": 2, "pairs": [pair(0, DOG_BOX, 0.9), pair(1, FIELD_BOX, 0.8)]}]
    ok = {**GOOD, "pairs": [pair(0, DOG_BOX, 0.9)]}
    bad = [
        {**ok, "key": "null_pair", "pairs": [pair(0, DOG_BOX, 0.9), None]},
        {**ok, "key": "null_chunk_index", "pairs": [pair(0, DOG_BOX, 0.9), {**pair(1, DOG_BOX, 0.8), "chunk": None}]},
        {**ok, "key": "null_chunk", "chunks": [None, chunk(9, 15)]},
        {**ok, "key": "null_offset", "chunks": [{**chunk(0, 5, 0, 15), "expr_end": None}, chunk(9, 15)]},
    ]
    alone, no_rejects = run(good)
    assert no_rejects.num_rows == 0
    out, rejects = run([good[0], bad[0], bad[1], good[1], bad[2], bad[3]])
    assert out.to_pylist() == alone.to_pylist()
    assert rejects.to_pylist() == [
        {"key": "null_pair", "stage": "compose", "reason": "bad_detection", "detail": "pair 1 is null"},
        {"key": "null_chunk_index", "stage": "compose", "reason": "bad_detection",
         "detail": "pair 1 has a null chunk index"},
        {"key": "null_chunk", "stage": "compose", "reason": "bad_chunk", "detail": "chunk 0 is null"},
        {"key": "null_offset", "stage": "compose", "reason": "bad_chunk", "detail": "chunk 0 has a null offset"},
    ]
