"""Kosmos-2 location tokens: encoders against the official rule and transformers, decoder against the
oracle of transformers' own tests, round-trip properties, bad input."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers.models.kosmos2.processing_kosmos2 import (
    coordinate_to_patch_index,
    patch_index_to_coordinate,
)

from schemas.location import (
    NUM_LOCATION_TOKENS,
    P,
    all_location_tokens,
    cell_box,
    decode_box,
    encode_box,
    location_tokens,
    parse_patch_index_token,
    patch_index_token,
)

EVAL = Path(__file__).resolve().parent / "data"


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (EVAL / name).read_text().splitlines() if line.strip()]


def _official_unilm(box):
    """The official training code's rule, written out independently (microsoft/unilm
    kosmos-2/unilm/data/vl/obj_utils.py `get_box_coords_index`): floor(v / cell), bottom-right clamped."""
    cell = 1.0 / P
    ul = math.floor(max(box[0], 0) / cell) + math.floor(max(box[1], 0) / cell) * P
    lr = math.floor(min(box[2], 0.99999) / cell) + math.floor(min(box[3], 0.99999) / cell) * P
    return ul, lr


coord = st.floats(0.0, 1.0, allow_nan=False)


@st.composite
def boxes(draw):
    a, b, c, d = draw(coord), draw(coord), draw(coord), draw(coord)
    if a == b or c == d:
        a, b = 0.25, 0.5
    x1, x2 = sorted((a, b))
    y1, y2 = sorted((c, d)) if c != d else (0.1, 0.9)
    return x1, y1, x2, y2


# Boxes whose corners sit exactly on cell edges, where the two encoders are meant to differ.
edge = st.integers(0, P).map(lambda k: k / P)


@st.composite
def edge_boxes(draw):
    x1, x2 = sorted(draw(st.lists(edge, min_size=2, max_size=2, unique=True)))
    y1, y2 = sorted(draw(st.lists(edge, min_size=2, max_size=2, unique=True)))
    return x1, y1, x2, y2


@st.composite
def valid_pairs(draw):
    r1, r2 = sorted((draw(st.integers(0, P - 1)), draw(st.integers(0, P - 1))))
    c1, c2 = sorted((draw(st.integers(0, P - 1)), draw(st.integers(0, P - 1))))
    return r1 * P + c1, r2 * P + c2


def test_published_grit_boxes_encode_to_the_documented_tokens():
    row = next(r for r in _jsonl("grit_published_samples.jsonl") if r["format"] == "grit_native")
    got = [location_tokens(*encode_box(e[2:6])) for e in row["noun_chunks"]]
    # The README's documented tokens (DESIGN.md and tests/data/README.md), in the row's entry order.
    assert got == ["<patch_index_0288><patch_index_0990>", "<patch_index_0000><patch_index_1022>"]


@pytest.mark.parametrize("rec", [r for r in _jsonl("kosmos2_location_token_oracle.jsonl")
                                 if r["kind"] == "patch_index_to_coordinate"], ids=lambda r: r["phrase"])
def test_decode_matches_transformers_oracle(rec):
    assert rec["num_patches_per_side"] == P
    assert decode_box(rec["ul"], rec["lr"]) == pytest.approx(tuple(rec["box_xyxy_norm"]), abs=1e-12)


def test_decode_whole_cells_when_corners_share_a_row_or_column():
    assert decode_box(33, 33) == (1 / 32, 1 / 32, 2 / 32, 2 / 32)  # one cell
    assert decode_box(33, 40) == (1 / 32, 1 / 32, 9 / 32, 2 / 32)  # same row
    assert decode_box(33, 33 + 5 * 32) == (1 / 32, 1 / 32, 2 / 32, 7 / 32)  # same column
    assert decode_box(0, 1023) == (0.5 / 32, 0.5 / 32, 31.5 / 32, 31.5 / 32)  # centres


@given(boxes())
def test_unilm_encoder_is_the_official_rule(box):
    assert encode_box(box) == encode_box(box, "unilm") == _official_unilm(box)


@given(boxes())
def test_hf_encoder_is_transformers(box):
    if box[2] * P - 1 > -1 and box[3] * P - 1 > -1:
        assert encode_box(box, "hf") == coordinate_to_patch_index(box, P)
    else:  # x2 or y2 below ~1e-17: `v * 32 - 1` rounds to -1.0, transformers gives a negative cell; we clamp
        ul, lr = encode_box(box, "hf")
        assert 0 <= lr < NUM_LOCATION_TOKENS and lr % P >= ul % P and lr // P >= ul // P


@given(edge_boxes())
def test_encoders_differ_only_on_bottom_right_cell_edges(box):
    u, h = encode_box(box, "unilm"), encode_box(box, "hf")
    assert u[0] == h[0]
    inner_edge = [0 < v * P < P for v in box[2:]]  # x2, y2 on an inner edge
    dc = u[1] % P - h[1] % P
    dr = u[1] // P - h[1] // P
    assert (dc, dr) == (int(inner_edge[0]), int(inner_edge[1]))


@given(boxes(), st.sampled_from(["unilm", "hf"]))
def test_decode_of_encode_lies_inside_the_cells_and_cells_hold_the_corners(box, encoder):
    ul, lr = encode_box(box, encoder)
    ul_cell, lr_cell = cell_box(ul), cell_box(lr)
    x1, y1, x2, y2 = decode_box(ul, lr)
    assert ul_cell[0] <= x1 < x2 <= lr_cell[2] and ul_cell[1] <= y1 < y2 <= lr_cell[3]
    # The upper-left corner lies in its cell; the bottom-right one in its cell (closed on the far edge).
    assert ul_cell[0] <= box[0] < ul_cell[2] or box[0] == 1.0
    assert ul_cell[1] <= box[1] < ul_cell[3] or box[1] == 1.0
    assert lr_cell[0] <= box[2] <= lr_cell[2] and lr_cell[1] <= box[3] <= lr_cell[3]


@given(valid_pairs())
def test_encode_of_decode_is_identity(pair):
    assert encode_box(decode_box(*pair), "hf") == pair
    ul, lr = pair
    shares = ul % P == lr % P or ul // P == lr // P
    if not shares:
        assert encode_box(decode_box(*pair), "unilm") == pair
    else:  # whole-cell decoding puts x2/y2 on the next cell's edge, which floor assigns to that cell
        u_lr = encode_box(decode_box(*pair), "unilm")[1]
        assert u_lr % P == min(lr % P + 1, P - 1) and u_lr // P == min(lr // P + 1, P - 1)


def test_transformers_decoder_agrees_on_every_valid_pair_sample():
    for ul in range(0, NUM_LOCATION_TOKENS, 37):
        for lr in range(ul, NUM_LOCATION_TOKENS, 41):
            if lr % P >= ul % P:
                assert decode_box(ul, lr) == patch_index_to_coordinate(ul, lr, P)


def test_tokens():
    assert patch_index_token(0) == "<patch_index_0000>"
    assert patch_index_token(1023) == "<patch_index_1023>"
    assert parse_patch_index_token("<patch_index_0288>") == 288
    assert location_tokens(288, 990) == "<patch_index_0288><patch_index_0990>"
    toks = all_location_tokens()
    assert len(toks) == 1024 and len(set(toks)) == 1024
    assert [parse_patch_index_token(t) for t in toks] == list(range(1024))
    for bad in ("<patch_index_1024>", "<patch_index_12>", "patch_index_0001", "<patch_index_00001>"):
        with pytest.raises(ValueError):
            parse_patch_index_token(bad)
    for bad in (-1, 1024, 3.0, True):
        with pytest.raises(ValueError):
            patch_index_token(bad)


@pytest.mark.parametrize("encoder", ["unilm", "hf"])
@pytest.mark.parametrize(
    ("box", "message"),
    [
        ((float("nan"), 0.1, 0.5, 0.5), "finite"),
        ((0.1, 0.1, float("inf"), 0.5), "finite"),
        ((0.1, 0.1, 0.5, -float("inf")), "finite"),
        ((-0.01, 0.1, 0.5, 0.5), "outside"),
        ((0.1, 0.1, 1.2, 0.5), "outside"),
        ((0.5, 0.1, 0.2, 0.5), "inverted"),
        ((0.1, 0.5, 0.5, 0.5), "inverted"),
        ((0.1, 0.5, 0.5), "4 numbers"),
        (("a", 0.5, 0.6, 0.7), "numbers"),
    ],
)
def test_bad_boxes_raise_clear_errors(encoder, box, message):
    with pytest.raises(ValueError, match=message):
        encode_box(box, encoder)


def test_unknown_encoder_and_bad_pairs():
    with pytest.raises(ValueError, match="unknown location encoder"):
        encode_box((0.1, 0.1, 0.2, 0.2), "glip")
    with pytest.raises(ValueError, match="inverted"):
        decode_box(40, 33)  # lower-right cell left of the upper-left one
    with pytest.raises(ValueError, match="outside"):
        decode_box(0, 1024)


def test_box_touching_the_far_edges():
    assert encode_box((0.0, 0.0, 1.0, 1.0), "unilm") == (0, 1023)
    assert encode_box((0.0, 0.0, 1.0, 1.0), "hf") == (0, 1023)
    assert encode_box((0.0, 0.0, 0.5, 0.5), "unilm") == (0, 16 * 32 + 16)
    assert encode_box((0.0, 0.0, 0.5, 0.5), "hf") == (0, 15 * 32 + 15)
