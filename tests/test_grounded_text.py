"""Grounded-caption formats: every record of the transformers Kosmos-2 oracle, agreement with transformers'
own parser, build/parse round-trip properties, unsafe captions and malformed text."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.kosmos2.processing_kosmos2 import clean_text_and_extract_entities_with_bboxes

from schemas.grounded_text import (
    GroundedSpan,
    ParsedCaption,
    UnsafeCaptionError,
    build_grounded_caption,
    build_markdown_caption,
    parse_grounded_caption,
    parse_markdown_caption,
    unsafe_caption_reason,
)
from schemas.location import P, decode_box, encode_box

EVAL = Path(__file__).resolve().parent / "data"
ORACLE = [json.loads(line) for line in (EVAL / "kosmos2_location_token_oracle.jsonl").read_text().splitlines()
          if line.strip()]


# --- helpers ----------------------------------------------------------------------------------------------


def hf_view(parsed: ParsedCaption):
    """Our parse in the shape of transformers' `clean_text_and_extract_entities_with_bboxes` (which reports
    only phrases that have boxes)."""
    return parsed.caption, [(parsed.caption[s.start:s.end], (s.start, s.end), list(s.coordinates()))
                            for s in parsed.spans if s.boxes]


def hf_phrase_boxes(bboxes, n_phrases: int) -> list[list]:
    """transformers' per-phrase `bboxes` argument -> one list of boxes per phrase (None kept, to be refused)."""
    if not bboxes:  # None or []: the processor leaves the text as it is
        return [[] for _ in range(n_phrases)]
    assert len(bboxes) == n_phrases
    out = []
    for b in bboxes:
        if b is None:
            out.append([])
        elif len(b) == 2 and all(isinstance(v, int) for v in b):
            out.append([tuple(b)])
        else:
            out.append([None if x is None else tuple(x) for x in b])
    return out


_TAG_SPLIT = re.compile(r"(<[^<>]+>)")


def processor_caption_and_spans(input_text: str, bboxes) -> tuple[str, list]:
    """What transformers' Kosmos2Processor + XLM-R tokenizer make of `input_text` and `bboxes`, as a caption
    and spans: tag tokens strip the whitespace around them and every text run between tags is one
    SentencePiece run (word-initial space, no trailing space), so the caption is the stripped runs joined by
    single spaces. Patch indices already in the text belong to the phrase before them."""
    runs: list[str] = []
    spans: list[list] = []
    length = 0
    in_phrase = in_object = False
    for tok in _TAG_SPLIT.split(input_text):
        if tok.startswith("<"):
            if tok == "<phrase>":
                in_phrase = True
            elif tok == "</phrase>":
                in_phrase = False
            elif tok == "<object>":
                in_object, pending = True, []
            elif tok == "</object>":
                in_object = False
                spans[-1][2].extend(zip(pending[::2], pending[1::2], strict=True))
            elif tok.startswith("<patch_index_"):
                pending.append(int(tok[13:17]))
            continue
        run = tok.strip()
        if not run:
            continue
        assert not in_object
        start = length + (1 if runs else 0)
        runs.append(run)
        length = start + len(run)
        if in_phrase:
            spans.append([start, length, []])
    for span, boxes in zip(spans, hf_phrase_boxes(bboxes, len(spans)), strict=True):
        span[2].extend(boxes)
    return " ".join(runs), [tuple(s) for s in spans]


# --- the oracle (transformers' own Kosmos-2 tests) -------------------------------------------------------


def test_oracle_kinds_are_all_handled():
    assert {r["kind"] for r in ORACLE} == {"preprocess_text", "preprocess_text_error", "post_process_generation",
                                          "patch_index_to_coordinate"}
    assert len(ORACLE) == 24


@pytest.mark.parametrize("rec", [r for r in ORACLE if r["kind"] == "preprocess_text"],
                         ids=lambda r: json.dumps(r["bboxes"]))
def test_oracle_preprocess_text(rec):
    caption, spans = processor_caption_and_spans(rec["input_text"], rec["bboxes"])
    assert build_grounded_caption(caption, spans) == rec["expected_text"]
    parsed = parse_grounded_caption(rec["expected_text"])
    assert parsed == (caption, tuple(GroundedSpan(s, e, tuple(b)) for s, e, b in spans))
    assert hf_view(parsed) == clean_text_and_extract_entities_with_bboxes(rec["expected_text"])


@pytest.mark.parametrize("rec", [r for r in ORACLE if r["kind"] == "preprocess_text_error"],
                         ids=lambda r: json.dumps(r["bboxes"]))
def test_oracle_preprocess_text_error(rec):
    assert rec["expected"] == "ValueError"
    caption, spans = processor_caption_and_spans(rec["input_text"], rec["bboxes"])
    with pytest.raises(ValueError, match="None"):
        build_grounded_caption(caption, spans)


@pytest.mark.parametrize("rec", [r for r in ORACLE if r["kind"] == "post_process_generation"],
                         ids=lambda r: r["expected_clean_text"][:20])
def test_oracle_post_process_generation(rec):
    parsed = parse_grounded_caption(rec["processed_text"])
    assert parsed.caption == rec["expected_clean_text"]
    assert [(parsed.caption[s.start:s.end], [s.start, s.end], [list(b) for b in s.coordinates()])
            for s in parsed.spans] == [(e["phrase"], e["char_span"], e["boxes_xyxy_norm"])
                                       for e in rec["expected_entities"]]
    assert hf_view(parsed) == clean_text_and_extract_entities_with_bboxes(rec["processed_text"])
    # Kosmos-2's own generations are in exactly the form our builder writes.
    assert build_grounded_caption(parsed.caption, parsed.spans) == rec["processed_text"]


@pytest.mark.parametrize("rec", [r for r in ORACLE if r["kind"] == "patch_index_to_coordinate"],
                         ids=lambda r: r["phrase"])
def test_oracle_patch_index_to_coordinate(rec):
    assert rec["num_patches_per_side"] == P
    assert list(decode_box(rec["ul"], rec["lr"])) == rec["box_xyxy_norm"]
    span = GroundedSpan(0, 1, ((rec["ul"], rec["lr"]),))
    assert parse_grounded_caption(build_grounded_caption("x", [span])).spans[0].coordinates() == (
        tuple(rec["box_xyxy_norm"]),)


# --- documented examples ---------------------------------------------------------------------------------


def test_markdown_examples():
    assert build_markdown_caption("a dog in a field", [(0, 5, [(288, 990)])]) == (
        "[a dog](<patch_index_0288><patch_index_0990>) in a field")
    two = build_markdown_caption("two dogs", [(0, 8, [(79, 1016), (135, 1008)])])
    assert two == ("[two dogs](<patch_index_0079><patch_index_1016></delimiter_of_multi_objects/>"
                   "<patch_index_0135><patch_index_1008>)")
    assert parse_markdown_caption(two) == ("two dogs", (GroundedSpan(0, 8, ((79, 1016), (135, 1008))),))
    assert build_markdown_caption("see [x](y)", [(0, 3, [])]) == "[see]() \\[x\\](y)"


def test_float_boxes_are_encoded_with_the_chosen_encoder():
    edge_box = (0.0, 0.0, 0.5, 0.5)  # bottom-right exactly on a cell edge
    unilm = build_grounded_caption("a cat", [(0, 5, [edge_box])])
    hf = build_grounded_caption("a cat", [(0, 5, [edge_box])], encoder="hf")
    assert unilm.endswith(f"<patch_index_0000><patch_index_{16 * 32 + 16:04d}></object>")
    assert hf.endswith(f"<patch_index_0000><patch_index_{15 * 32 + 15:04d}></object>")
    assert parse_grounded_caption(unilm).spans[0].boxes == (encode_box(edge_box),)


# --- agreement with transformers' parser -----------------------------------------------------------------

AGREEMENT_CASES = [
    ("Two puppies sit in a field of grass.", [(0, 11, [(79, 1016), (135, 1008)]), (30, 35, [(480, 1023)])]),
    ("a dog, a cat; and  two   birds!", [(0, 5, [(0, 1023)]), (7, 12, [(33, 66)]), (19, 28, [(5, 911)])]),
    ("(a dog) and [a cat]", [(1, 6, [(1, 2)]), (13, 18, [(44, 863), (5, 911), (48, 250)])]),
    ("dogcat", [(0, 3, [(1, 2)]), (3, 6, [(3, 4)])]),
    ("a snowman", [(0, 9, [(44, 863)])]),
    ("🐶 كلب יפה and a > b", [(0, 1, [(0, 33)]), (2, 5, [(400, 532)]), (14, 19, [(610, 872)])]),
    ("x\ty\u00a0z end.", [(2, 3, [(796, 1023)]), (4, 5, [(240, 604)]), (6, 9, [(0, 0)])]),
]


@pytest.mark.parametrize(("caption", "spans"), AGREEMENT_CASES, ids=[c for c, _ in AGREEMENT_CASES])
def test_transformers_parser_agrees(caption, spans):
    text = build_grounded_caption(caption, spans)
    parsed = parse_grounded_caption(text)
    assert parsed == (caption, tuple(GroundedSpan(s, e, tuple(b)) for s, e, b in spans))
    assert clean_text_and_extract_entities_with_bboxes(text) == hf_view(parsed)
    assert [c for c, _, _ in hf_view(parsed)[1]] == [caption[s:e] for s, e, _ in spans]


# --- properties ------------------------------------------------------------------------------------------

PIECES = list("abcdefgh XYZ,.!?'\"()[]\\>-_:;é") + [
    "  ", "🐶", "👩‍👩‍👧", "שלום", "كلب", "\u00a0", "\t", "\n", "](", "<", "<phrase>", "</object>",
    "<patch_index_0001>", "</delimiter_of_multi_objects/>", "[a](<patch_index_0001><patch_index_0002>)"]
raw_captions = st.lists(st.sampled_from(PIECES), max_size=30).map("".join)


@st.composite
def valid_pairs(draw):
    r1, r2 = sorted((draw(st.integers(0, P - 1)), draw(st.integers(0, P - 1))))
    c1, c2 = sorted((draw(st.integers(0, P - 1)), draw(st.integers(0, P - 1))))
    return r1 * P + c1, r2 * P + c2


@st.composite
def captions_with_spans(draw, kosmos_safe: bool, min_boxes: int = 0):
    caption = draw(raw_captions)
    if kosmos_safe:
        caption = caption.replace("<", "").strip()
    cuts = sorted(draw(st.lists(st.integers(0, len(caption)), max_size=8)))
    spans = []
    for s, e in zip(cuts[::2], cuts[1::2], strict=False):
        if kosmos_safe:  # Kosmos-2 parsers strip a phrase's edges, so spans never start/end with whitespace
            while s < e and caption[s].isspace():
                s += 1
            while e > s and caption[e - 1].isspace():
                e -= 1
        if s < e:
            spans.append(GroundedSpan(s, e, tuple(draw(st.lists(valid_pairs(), min_size=min_boxes, max_size=3)))))
    return caption, tuple(spans)


@settings(max_examples=200)
@given(captions_with_spans(kosmos_safe=True))
def test_kosmos_round_trip(case):
    caption, spans = case
    assert unsafe_caption_reason(caption) is None
    assert parse_grounded_caption(build_grounded_caption(caption, spans)) == (caption, spans)
    assert parse_grounded_caption(build_grounded_caption(caption, reversed(spans))) == (caption, spans)


@settings(max_examples=200)
@given(captions_with_spans(kosmos_safe=True, min_boxes=1))
def test_kosmos_agrees_with_transformers(case):
    caption, spans = case
    text = build_grounded_caption(caption, spans)
    assert clean_text_and_extract_entities_with_bboxes(text) == hf_view(ParsedCaption(caption, spans))


@settings(max_examples=200)
@given(captions_with_spans(kosmos_safe=False))
def test_markdown_round_trip_any_caption(case):
    caption, spans = case
    text = build_markdown_caption(caption, spans)
    assert parse_markdown_caption(text) == (caption, spans)
    # Every bracket of the caption is escaped: the unescaped ones are exactly the links' own.
    unescaped = re.sub(r"\\.", "", text)
    assert unescaped.count("[") == unescaped.count("](") == len(spans)


@given(raw_captions)
def test_unsafe_captions_are_flagged_and_refused(caption):
    reason = unsafe_caption_reason(caption)
    if "<" in caption or caption != caption.strip():
        assert reason
        with pytest.raises(UnsafeCaptionError):
            build_grounded_caption(caption, [])
    else:
        assert reason is None
        assert parse_grounded_caption(build_grounded_caption(caption, [])) == (caption, ())


# --- unsafe captions, bad spans, malformed text -----------------------------------------------------------


@pytest.mark.parametrize("caption", ["<phrase>a dog</phrase>", "I <3 NY", "a <patch_index_0001> b", "x </object>",
                                     "tag</delimiter_of_multi_objects/>", "<grounding> hi", " lead", "trail ",
                                     "\tx", "x\n"])
def test_unsafe_caption_reason_flags(caption):
    reason = unsafe_caption_reason(caption)
    assert reason and ("'<" in reason or "whitespace" in reason)
    with pytest.raises(UnsafeCaptionError):
        build_grounded_caption(caption, [])


@pytest.mark.parametrize("caption", ["a > b", "[x](y) ](", "emoji 🐶", "שלום עולם", "a  b", "back\\slash", ""])
def test_safe_captions(caption):
    assert unsafe_caption_reason(caption) is None


def test_tag_like_captions_still_work_in_markdown():
    caption = "<phrase>a dog</phrase> [sic]"
    spans = (GroundedSpan(8, 13, ((1, 2),)),)
    assert parse_markdown_caption(build_markdown_caption(caption, spans)) == (caption, spans)


@pytest.mark.parametrize(
    ("spans", "message"),
    [
        ([(0, 5, [(1, 2)]), (3, 8, [])], "overlap"),
        ([(0, 50, [])], "outside"),
        ([(3, 3, [])], "empty"),
        ([(-1, 3, [])], "outside"),
        ([(0, 3)], "start, end, boxes"),
        ([(0, 3, [(1, 2, 3)])], "patch-index pair or a normalized"),
        ([(0, 3, [None])], "None"),
        ([(0, 3, [(40, 33)])], "inverted"),
        ([(0, 3, [(0.5, 0.5, 0.2, 0.9)])], "inverted"),
        ([(0, 3, [(float("nan"), 0.5, 0.6, 0.9)])], "finite"),
    ],
)
def test_bad_spans_raise(spans, message):
    for build in (build_grounded_caption, build_markdown_caption):
        with pytest.raises(ValueError, match=message):
            build("a dog runs", spans)


def test_kosmos_refuses_spans_with_whitespace_edges():
    with pytest.raises(ValueError, match="whitespace"):
        build_grounded_caption("a dog runs", [(1, 5, [(1, 2)])])
    assert parse_markdown_caption(build_markdown_caption("a dog runs", [(1, 5, [])])).spans == (
        GroundedSpan(1, 5, ()),)


@pytest.mark.parametrize("text", [
    "<grounding><phrase> a dog</phrase",
    "<grounding> a <object><patch_index_0001><patch_index_0002></object>",
    "<grounding><phrase> </phrase> x",
    "<grounding><phrase> a<phrase> b</phrase></phrase>",
    "<grounding> a <grounding> b",
    "<grounding> a <b>bold</b>",
    "<grounding><phrase> dog</phrase><object><patch_index_0040><patch_index_0033></object>",
    "<grounding><phrase> dog</phrase><object><patch_index_0000><patch_index_1024></object>",
    "<grounding><phrase> dog</phrase><object><patch_index_0001></object>",
    "<grounding> I <3 you",
])
def test_malformed_grounded_text_raises(text):
    with pytest.raises(ValueError):
        parse_grounded_caption(text)


@pytest.mark.parametrize("text", ["a \\ b", "[a](", "[a]", "a] b", "[[a]()]()", "[a](<patch_index_0001>)",
                                  "[](<patch_index_0001><patch_index_0002>)", "[a", "end\\",
                                  "[a](<patch_index_0040><patch_index_0033>)"])
def test_malformed_markdown_raises(text):
    with pytest.raises(ValueError):
        parse_markdown_caption(text)
