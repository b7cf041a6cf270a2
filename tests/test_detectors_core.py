"""Prompt building in both forms (caption and joined chunks), the positive map (hand-computed against a tiny
BERT vocab), caption windows over the token budget, prompt splitting, chunk scores (mean and max),
candidate finalizing with the per-chunk reserve, the official resize rule, and the out-of-memory batch
halving."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import random

import numpy as np
import pytest
import torch

from schemas.rows import RejectReason
from stages.detectors.base import ChunkPrompt, finalize
from stages.detectors.batching import autocast_dtype, is_oom, pad_images, run_batched
from stages.detectors.postprocess import chunk_scores, cxcywh_to_xyxy, entries_from_probs
from stages.detectors.prompts import (
    build_prompt,
    caption_passes,
    normalize_caption,
    positive_map,
    split_prompt,
)
from stages.detectors.tiny import write_bert_vocab
from stages.images import ResizeSpec


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(str(write_bert_vocab(tmp_path_factory.mktemp("vocab"))))


def count_with(tokenizer):
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def offsets_with(tokenizer):
    return lambda text: [tuple(o) for o in tokenizer(text, add_special_tokens=False,
                                                     return_offsets_mapping=True)["offset_mapping"]]


def token_chunks(tokenizer, p, n_chunks):
    """Each token of `p.text` (specials included) -> its chunks, from the positive map."""
    enc = tokenizer(p.text, return_offsets_mapping=True)
    m = positive_map(enc["offset_mapping"], p, n_chunks)
    return tokenizer.convert_ids_to_tokens(enc["input_ids"]), [np.flatnonzero(m[:, t]).tolist() for t in range(m.shape[1])]


# --- the chunks form -----------------------------------------------------------------------------------


def test_build_prompt_joins_chunks_with_separators():
    p = build_prompt(["a dog", "a field", "flowers"])
    assert p.text == "a dog . a field . flowers ."
    assert p.char_spans == ((0, 5), (8, 15), (18, 25))
    assert p.chunk_ids == (0, 1, 2)
    assert [p.text[s:e] for s, e in p.char_spans] == ["a dog", "a field", "flowers"]


def test_build_prompt_cleans_whitespace_and_skips_empty_chunks():
    p = build_prompt(["a\n big  dog", "  ", "grass"], chunk_ids=[4, 5, 6])
    assert p.text == "a big dog . grass ."
    assert p.chunk_ids == (4, 6)


def test_chunk_prompt_from_caption():
    cp = ChunkPrompt.from_caption("a dog in a field of flowers", [(0, 5), (9, 16), (20, 27)])
    assert cp.phrases == ("a dog", "a field", "flowers") and cp.caption == "a dog in a field of flowers"


def test_positive_map_chunks_form_hand_computed(tokenizer):
    tokens, chunks = token_chunks(tokenizer, build_prompt(["a dog", "a field", "flowers"]), 3)
    assert tokens == ["[CLS]", "a", "dog", ".", "a", "field", ".", "flowers", ".", "[SEP]"]
    assert chunks == [[], [0], [0], [], [1], [1], [], [2], [], []]


def test_positive_map_word_pieces_belong_to_their_chunk(tokenizer):
    # "balls" is not in the vocab: ball + ##s; "zebra" is spelled out letter by letter
    tokens, chunks = token_chunks(tokenizer, build_prompt(["red balls", "zebra"], chunk_ids=[3, 7]), 8)
    assert tokens == ["[CLS]", "red", "ball", "##s", ".", "z", "##e", "##b", "##r", "##a", ".", "[SEP]"]
    assert chunks == [[], [3], [3], [3], [], [7], [7], [7], [7], [7], [], []]


def test_positive_map_padding_tokens_belong_nowhere(tokenizer):
    p = build_prompt(["a dog"])
    enc = tokenizer([p.text, "a dog . a big red cat ."], padding="longest", return_offsets_mapping=True)
    assert positive_map(enc["offset_mapping"][0], p, 1)[0].tolist() == [False, True, True] + [False] * 7


def test_split_prompt_hand_computed(tokenizer):
    phrases = ["a dog", "a field", "flowers"]  # 3, 3 and 2 tokens with their " ."
    count = count_with(tokenizer)
    assert [p.text for p in split_prompt(phrases, count, budget=256).passes] == ["a dog . a field . flowers ."]
    assert [p.text for p in split_prompt(phrases, count, budget=8).passes] == ["a dog . a field .", "flowers ."]
    parts = split_prompt(phrases, count, budget=7).passes
    assert [p.text for p in parts] == ["a dog .", "a field . flowers ."]
    assert [p.chunk_ids for p in parts] == [(0,), (1, 2)]
    assert parts[1].char_spans == ((0, 7), (10, 17))


def test_split_prompt_passes_fit_the_budget(tokenizer):
    phrases = ["a big red dog", "the green grass", "a small cat", "flowers", "a blue sky", "a table"] * 3
    for budget in (6, 9, 12, 20):
        planned = split_prompt(phrases, count_with(tokenizer), budget=budget)
        placed = sorted(c for p in planned.passes for c in p.chunk_ids)
        assert sorted(placed + list(planned.too_long)) == list(range(len(phrases)))
        for p in planned.passes:
            assert len(tokenizer(p.text)["input_ids"]) <= budget


def test_split_prompt_lone_chunk_over_budget_is_reported_not_truncated(tokenizer):
    planned = split_prompt(["a dog", "a big red dog on the green grass", "a cat"], count_with(tokenizer), budget=6)
    assert [p.chunk_ids for p in planned.passes] == [(0,), (2,)] and planned.too_long == (1,)


def test_split_prompt_rejects_a_budget_without_room():
    with pytest.raises(ValueError):
        split_prompt(["a dog"], len, budget=3)


# --- the caption form ----------------------------------------------------------------------------------


def test_normalize_caption_maps_every_span():
    caption = "  A Dog\n in a\t\tFIELD of flowers"
    text, where = normalize_caption(caption)
    assert text == "a dog in a field of flowers ."
    field = caption.index("FIELD")
    for s, e, expect in [(2, 7, "a dog"), (2, 8, "a dog"), (field, field + 5, "field"), (field - 2, field + 5, "field"),
                         (2, len(caption), "a dog in a field of flowers")]:
        assert text[where[s]:where[e]].strip() == expect
    assert normalize_caption("a red ball.")[0] == "a red ball."  # already ends in ".": kept as it is
    assert normalize_caption(" \t ")[0] == ""


def test_normalize_caption_follows_a_character_that_lowers_to_two():
    caption = "İstanbul DOG"  # "İ".lower() is two characters
    text, where = normalize_caption(caption)
    assert text == caption.lower() + " ."
    assert text[where[9]:where[12]] == "dog"


def test_caption_pass_hand_computed(tokenizer):
    caption = "A dog in a  Field of flowers"
    spans = [(0, 5), (9, 17), (caption.index("flowers"), len(caption))]  # "a  Field": a whitespace run inside
    planned = caption_passes(caption, spans, offsets_with(tokenizer), budget=256)
    [p] = planned.passes
    assert p.text == "a dog in a field of flowers ." and p.chunk_ids == (0, 1, 2)
    tokens, chunks = token_chunks(tokenizer, p, 3)
    assert tokens == ["[CLS]", "a", "dog", "in", "a", "field", "of", "flowers", ".", "[SEP]"]
    # the chunks' whole spans; the words between them, the " ." and the special tokens belong to none
    assert chunks == [[], [0], [0], [], [1], [1], [], [2], [], []]


def test_caption_overlapping_chunks_share_tokens(tokenizer):
    caption = "a dog in a field"
    [p] = caption_passes(caption, [(0, 16), (0, 5), (9, 16)], offsets_with(tokenizer), budget=256).passes
    _, chunks = token_chunks(tokenizer, p, 3)
    assert chunks[1:6] == [[0, 1], [0, 1], [0], [0, 2], [0, 2]]


def long_caption(n_chunks: int, seed: int = 0) -> tuple[str, list[tuple[int, int]]]:
    rng = random.Random(seed)
    words = ["big", "red", "small", "green", "blue"]
    nouns = ["dog", "cat", "ball", "tree", "car", "house", "table", "cup", "bike"]
    parts, spans, pos = [], [], 0
    for i in range(n_chunks):
        chunk = f"a {rng.choice(words)} {rng.choice(nouns)}"
        spans.append((pos, pos + len(chunk)))
        tail = rng.choice([" on ", " with ", " and ", " in the ", ", "]) if i < n_chunks - 1 else ""
        parts.append(chunk + tail)
        pos += len(chunk) + len(tail)
    return "".join(parts), spans


@pytest.mark.parametrize(("n_chunks", "budget"), [(12, 16), (40, 24), (90, 256), (200, 256), (30, 9)])
def test_caption_windows_cover_every_chunk_once_within_the_budget(tokenizer, n_chunks, budget):
    caption, spans = long_caption(n_chunks, seed=n_chunks)
    offsets = offsets_with(tokenizer)
    text, where = normalize_caption(caption)
    planned = caption_passes(caption, spans, offsets, budget=budget)
    whole = len(tokenizer(text)["input_ids"])
    assert (len(planned.passes) > 1) == (whole > budget)
    assert planned.too_long == ()
    seen = sorted(j for p in planned.passes for j in p.chunk_ids)
    assert seen == list(range(n_chunks))  # each chunk scored in exactly one pass
    for p in planned.passes:
        assert len(tokenizer(p.text)["input_ids"]) <= budget
        assert p.text.endswith(" .") and p.text[:-2] in text  # a contiguous stretch of the caption
        for j, (s, e) in zip(p.chunk_ids, p.char_spans, strict=True):
            assert p.text[s:e] == text[where[spans[j][0]]:where[spans[j][1]]]
        if len(planned.passes) > 1:  # windows carry context: more than their chunks
            assert len(tokenizer(p.text)["input_ids"]) >= budget - 3
    if len(planned.passes) > 1:
        assert text.endswith(planned.passes[-1].text)  # the last window ends where the caption ends


def test_caption_window_gives_a_chunk_its_context(tokenizer):
    caption, spans = long_caption(30, seed=3)
    planned = caption_passes(caption, spans, offsets_with(tokenizer), budget=24)
    middle = next(p for p in planned.passes if 15 in p.chunk_ids)
    k = middle.chunk_ids.index(15)
    s, e = middle.char_spans[k]
    assert middle.text[e:].strip(" .")  # words after the chunk are in its window
    rest = [p for p in planned.passes if p is not middle]
    assert all(15 not in p.chunk_ids for p in rest)


def test_caption_chunk_longer_than_the_budget_is_reported(tokenizer):
    caption = "a dog and a big red dog on the green grass with a cat"
    spans = [(0, 5), (10, 41), (47, 52)]
    planned = caption_passes(caption, spans, offsets_with(tokenizer), budget=7)
    assert planned.too_long == (1,)
    assert sorted(j for p in planned.passes for j in p.chunk_ids) == [0, 2]


# --- scores ----------------------------------------------------------------------------------------------

TOKEN_CHUNK = np.array([-1, 0, 0, -1, 1, 1, -1, 2, -1, -1])  # "[CLS] a dog . a field . flowers . [SEP]"


def test_chunk_score_mean_and_max_over_the_chunks_tokens():
    probs = np.array([[0.1, 0.2, 0.7, 0.9, 0.05, 0.3, 0.0, 0.01, 0.0, 0.0]], np.float32)
    pos = np.zeros((4, 10), bool)  # chunk 3 has no tokens
    for t, c in enumerate(TOKEN_CHUNK):
        if c >= 0:
            pos[c, t] = True
    mean, rest = chunk_scores(probs, pos, "mean")
    assert mean[0].tolist() == pytest.approx([0.45, 0.175, 0.01, 0.0])
    assert rest.tolist() == pytest.approx([0.9])
    assert chunk_scores(probs, pos, "max")[0][0].tolist() == pytest.approx([0.7, 0.3, 0.01, 0.0])
    with pytest.raises(ValueError):
        chunk_scores(probs, pos, "median")


def test_the_issue_case_mean_keeps_what_the_paper_keeps():
    """Token probabilities `a .30 dog .90` and `the .20 red .10 ball .80` at the paper's 0.65: the max
    keeps both chunks (0.90, 0.80), the mean -- GLIP's and GroundingDINO's rule -- neither (0.60, 0.37)."""
    probs = np.array([[0.30, 0.90, 0.20, 0.10, 0.80]], np.float32)
    token_chunk = np.array([0, 0, 1, 1, 1])
    box = np.array([[0.1, 0.1, 0.5, 0.5]])
    _, chunk, _, score, _ = entries_from_probs(probs, token_chunk, box, 2, floor=0.0, rule="max")
    assert score.tolist() == pytest.approx([0.90, 0.80])
    _, chunk, _, score, _ = entries_from_probs(probs, token_chunk, box, 2, floor=0.0)
    assert chunk.tolist() == [0, 1] and score.tolist() == pytest.approx([0.60, 0.3666667])
    assert not (score > 0.65).any()


def test_entries_hand_computed():
    probs = np.array([
        [0.1, 0.6, 0.8, 0.9, 0.2, 0.4, 0.0, 0.01, 0.0, 0.0],  # chunk 0 (mean 0.7) and 1 (0.3) above 0.25
        [0.5, 0.1, 0.1, 0.2, 0.1, 0.1, 0.0, 0.2, 0.0, 0.0],  # only [CLS] above: unassigned
        [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.0, 0.1, 0.0, 0.0],  # nothing above: dropped
    ], np.float32)
    boxes = cxcywh_to_xyxy(np.array([[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.1, 0.1]]))
    box, chunk, xyxy, score, box_score = entries_from_probs(probs, TOKEN_CHUNK, boxes, 3, floor=0.25,
                                                            first_box=100)
    assert box.tolist() == [100, 100, 101]
    assert chunk.tolist() == [0, 1, -1]
    assert score.tolist() == pytest.approx([0.7, 0.3, 0.5])
    assert box_score.tolist() == pytest.approx([0.9, 0.9, 0.5])
    assert xyxy[0].tolist() == pytest.approx([0.4, 0.3, 0.6, 0.7])
    assert xyxy[2].tolist() == pytest.approx([0.0, 0.0, 0.3, 0.3])  # clipped at the image edge


def test_entries_drop_boxes_outside_the_image():
    probs = np.full((1, 10), 0.9, np.float32)
    outside = cxcywh_to_xyxy(np.array([[1.5, 0.5, 0.2, 0.2]]))
    assert len(entries_from_probs(probs, TOKEN_CHUNK, outside, 3, floor=0.1)[0]) == 0


# --- finalize --------------------------------------------------------------------------------------------


def test_finalize_floor_cap_order_and_renumbering():
    box = np.array([7, 7, 3, 3, 9])
    chunk = np.array([1, 0, 2, 2, -1])
    xyxy = np.array([[0.1, 0.1, 0.2, 0.2]] * 2 + [[0.3, 0.3, 0.5, 0.5]] * 2 + [[0, 0, 1, 1]], float)
    score = np.array([0.6, 0.8, 0.3, 0.35, 0.05], np.float32)
    box_score = np.array([0.8, 0.8, 0.35, 0.35, 0.05], np.float32)
    d = finalize(box, chunk, xyxy, score, box_score, floor=0.1, max_candidates=10)
    # box 7 (best 0.8) -> 0, box 3 -> 1; duplicate (3, 2) keeps 0.35; box 9 under the floor
    assert d.box.tolist() == [0, 0, 1]
    assert d.chunk.tolist() == [0, 1, 2]
    assert d.score.tolist() == pytest.approx([0.8, 0.6, 0.35])
    assert d.xyxy[2].tolist() == [0.3, 0.3, 0.5, 0.5]
    capped = finalize(box, chunk, xyxy, score, box_score, floor=0.1, max_candidates=2)
    assert capped.chunk.tolist() == [0, 1] and capped.score.tolist() == pytest.approx([0.8, 0.6])
    reserved = finalize(box, chunk, xyxy, score, box_score, floor=0.1, max_candidates=2, chunk_candidates=1)
    assert reserved.chunk.tolist() == [0, 1, 2]  # chunk 2's best entry is kept past the cap


def test_finalize_ties_are_deterministic():
    box = np.array([2, 1, 0])
    args = (np.zeros(3, int), np.tile([[0.1, 0.1, 0.5, 0.5]], (3, 1)), np.full(3, 0.5, np.float32),
            np.full(3, 0.5, np.float32))
    d = finalize(box, *args, floor=0.1, max_candidates=2)
    assert d.box.tolist() == [0, 1]  # boxes 0 and 1 kept (lowest ids win ties), renumbered in that order
    again = finalize(box[::-1].copy(), *args, floor=0.1, max_candidates=2)
    assert again.box.tolist() == d.box.tolist()


def test_finalize_nothing_above_floor_says_why():
    d = finalize(np.array([0]), np.array([0]), np.array([[0, 0, 1, 1.0]]), np.array([0.05], np.float32),
                 np.array([0.05], np.float32), floor=0.1, max_candidates=5)
    assert len(d) == 0 and d.reason == RejectReason.NO_DETECTION and "0.1" in d.detail


def test_a_crowded_image_never_starves_a_chunk():
    """30 chunks; chunk 0 has 300 near-duplicate boxes scoring above every other chunk's best. Under a
    per-image cap of 100 alone the other chunks lose everything; with the reserve every chunk that has a
    candidate above the floor keeps its best ones, and the cap still bounds the rest."""
    rng = np.random.default_rng(0)
    n_chunks, dupes = 30, 300
    box = np.arange(dupes + 2 * (n_chunks - 1))
    chunk = np.r_[np.zeros(dupes, int), np.repeat(np.arange(1, n_chunks), 2)]
    score = np.r_[rng.uniform(0.8, 0.99, dupes), rng.uniform(0.15, 0.7, 2 * (n_chunks - 1))].astype(np.float32)
    score[-2:] = 0.05  # the last chunk has nothing above the floor
    xyxy = np.tile([[0.1, 0.1, 0.6, 0.6]], (len(box), 1)) + rng.uniform(0, 0.01, (len(box), 1))
    old = finalize(box, chunk, xyxy, score, score, floor=0.1, max_candidates=100)
    assert set(old.chunk.tolist()) == {0}
    d = finalize(box, chunk, xyxy, score, score, floor=0.1, max_candidates=100, chunk_candidates=5)
    assert set(d.chunk.tolist()) == set(range(n_chunks - 1))
    for j in range(1, n_chunks - 1):
        best = np.sort(score[(chunk == j) & (score >= np.float32(0.1))])[::-1]
        assert np.sort(d.score[d.chunk == j])[::-1].tolist() == pytest.approx(best.tolist())
    assert (d.chunk == 0).sum() == 100 and len(d) <= 100 + 5 * n_chunks


# --- the official resize rule ----------------------------------------------------------------------------


def documented_size(w: int, h: int, size: int, max_size: int | None) -> tuple[int, int]:
    """GroundingDINO's `get_size_with_aspect_ratio` as its code documents it (datasets/transforms.py),
    written out again here: the shorter side becomes `size`; if the longer side would then exceed
    `max_size`, `size` becomes round(max_size * shorter / longer) instead; an image whose shorter side
    already is `size` keeps its size; otherwise the longer side is int(size * longer / shorter)."""
    if max_size is not None:
        lo, hi = float(min(w, h)), float(max(w, h))
        if hi / lo * size > max_size:
            size = int(round(max_size * lo / hi))
    if (w <= h and w == size) or (h <= w and h == size):
        return w, h
    if w < h:
        return size, int(size * h / w)
    return int(size * w / h), size


def test_resize_follows_get_size_with_aspect_ratio_to_the_pixel():
    rng = random.Random(0)
    sizes = [(rng.randint(10, 6000), rng.randint(10, 6000)) for _ in range(5000)]
    sizes += [(w, h) for w in range(600, 1400, 7) for h in (450, 599, 600, 601, 799, 800, 801, 1333, 1334)]
    sizes += [(1333, 800), (800, 1333), (1600, 960), (1000, 750), (640, 480), (800, 800), (3, 5000), (7001, 11)]
    for size, max_size in [(800, 1333), (96, 160), (512, None)]:
        spec = ResizeSpec(size, max_size, "shorter")
        for w, h in sizes:
            expect = documented_size(w, h, size, max_size)
            if min(expect) == 0:  # an aspect ratio over 2 * max_size: the official rule gives no pixels
                assert min(spec.target(w, h)) == 1, (w, h)
                continue
            assert spec.target(w, h) == expect, (w, h, size, max_size)
    # the longer side is truncated, not rounded: 1000 x 750 -> 1066 (1066.67), as the official code does
    assert ResizeSpec(800, 1333).target(1000, 750) == (1066, 800)


# --- precision -------------------------------------------------------------------------------------------


def test_precision_is_what_the_config_says_on_any_device():
    for device in ("cpu", "cuda"):
        assert autocast_dtype(torch.device(device), "fp32") is None
        assert autocast_dtype(torch.device(device), "bf16") == torch.bfloat16
        assert autocast_dtype(torch.device(device), "fp16") == torch.float16
    with pytest.raises(ValueError):
        autocast_dtype(torch.device("cpu"), "auto")


# --- batching helpers ----------------------------------------------------------------------------------


def test_pad_images_masks_and_normalizes():
    a = np.full((4, 6, 3), 255, np.uint8)
    b = np.zeros((5, 3, 3), np.uint8)
    batch, valid = pad_images([a, b], mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), device=torch.device("cpu"))
    assert batch.shape == (2, 3, 5, 6) and valid.shape == (2, 5, 6)
    assert valid[0].sum() == 24 and valid[1].sum() == 15
    assert valid[0, :4, :6].all() and not valid[0, 4].any()
    assert torch.allclose(batch[0, :, :4, :6], torch.ones(1)) and torch.allclose(batch[1, :, :5, :3], -torch.ones(1))
    assert (batch[0, :, 4:, :] == 0).all()  # padding = the mean colour


def test_run_batched_halves_on_out_of_memory():
    seen = []

    def fn(batch):
        seen.append(len(batch))
        if len(batch) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 10 for x in batch]

    results, size = run_batched(list(range(7)), 8, fn)
    assert results == [0, 10, 20, 30, 40, 50, 60]
    assert seen == [7, 3, 3, 1]  # 7 fail -> 3 fit; the smaller size is kept for the rest
    assert size == 3


def test_run_batched_recognises_runtime_oom_and_raises_other_errors():
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_oom(RuntimeError("shape mismatch"))

    def broken(batch):
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        run_batched([1, 2], 2, broken)


def test_run_batched_out_of_memory_at_one_is_raised():
    def always(batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        run_batched([1, 2, 3], 4, always)
