"""Prompt building, the token -> chunk map (hand-computed against a tiny BERT vocab), prompt splitting,
post-processing of scores, candidate finalizing, and the out-of-memory batch halving."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from schemas.rows import RejectReason
from stages.detectors.base import ChunkPrompt, finalize
from stages.detectors.batching import is_oom, pad_images, run_batched
from stages.detectors.postprocess import chunk_scores, cxcywh_to_xyxy, entries_from_probs
from stages.detectors.prompts import build_prompt, split_prompt, token_chunk_map
from stages.detectors.tiny import write_bert_vocab


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(str(write_bert_vocab(tmp_path_factory.mktemp("vocab"))))


def count_with(tokenizer):
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


# --- prompts -----------------------------------------------------------------------------------------


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
    assert cp.phrases == ("a dog", "a field", "flowers")


def test_token_chunk_map_hand_computed(tokenizer):
    p = build_prompt(["a dog", "a field", "flowers"])
    enc = tokenizer(p.text, return_offsets_mapping=True)
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"])
    assert tokens == ["[CLS]", "a", "dog", ".", "a", "field", ".", "flowers", ".", "[SEP]"]
    assert token_chunk_map(enc["offset_mapping"], p).tolist() == [-1, 0, 0, -1, 1, 1, -1, 2, -1, -1]


def test_token_chunk_map_word_pieces_belong_to_their_chunk(tokenizer):
    # "balls" is not in the vocab: ball + ##s; "zebra" is spelled out letter by letter
    p = build_prompt(["red balls", "zebra"], chunk_ids=[3, 7])
    enc = tokenizer(p.text, return_offsets_mapping=True)
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"])
    assert tokens == ["[CLS]", "red", "ball", "##s", ".", "z", "##e", "##b", "##r", "##a", ".", "[SEP]"]
    assert token_chunk_map(enc["offset_mapping"], p).tolist() == [-1, 3, 3, 3, -1, 7, 7, 7, 7, 7, -1, -1]


def test_token_chunk_map_padding_tokens_map_nowhere(tokenizer):
    p = build_prompt(["a dog"])
    enc = tokenizer([p.text, "a dog . a big red cat ."], padding="longest", return_offsets_mapping=True)
    assert token_chunk_map(enc["offset_mapping"][0], p).tolist() == [-1, 0, 0, -1, -1, -1, -1, -1, -1, -1]


def test_split_prompt_hand_computed(tokenizer):
    phrases = ["a dog", "a field", "flowers"]  # 3, 3 and 2 tokens with their " ."
    count = count_with(tokenizer)
    assert [p.text for p in split_prompt(phrases, count, budget=256)] == ["a dog . a field . flowers ."]
    assert [p.text for p in split_prompt(phrases, count, budget=8)] == ["a dog . a field .", "flowers ."]
    parts = split_prompt(phrases, count, budget=7)
    assert [p.text for p in parts] == ["a dog .", "a field . flowers ."]
    assert [p.chunk_ids for p in parts] == [(0,), (1, 2)]
    assert parts[1].char_spans == ((0, 7), (10, 17))


def test_split_prompt_passes_fit_the_budget(tokenizer):
    phrases = ["a big red dog", "the green grass", "a small cat", "flowers", "a blue sky", "a table"] * 3
    for budget in (6, 9, 12, 20):
        passes = split_prompt(phrases, count_with(tokenizer), budget=budget)
        assert sorted(c for p in passes for c in p.chunk_ids) == list(range(len(phrases)))
        for p in passes:
            n = len(tokenizer(p.text)["input_ids"])
            assert n <= budget or len(p.chunk_ids) == 1  # only a chunk too long on its own overflows


def test_split_prompt_lone_chunk_over_budget_gets_its_own_pass(tokenizer):
    passes = split_prompt(["a dog", "a big red dog on the green grass", "a cat"], count_with(tokenizer), budget=6)
    assert [p.chunk_ids for p in passes] == [(0,), (1,), (2,)]


def test_split_prompt_rejects_a_budget_without_room():
    with pytest.raises(ValueError):
        split_prompt(["a dog"], len, budget=2)


# --- post-processing ---------------------------------------------------------------------------------

TOKEN_CHUNK = np.array([-1, 0, 0, -1, 1, 1, -1, 2, -1, -1])  # "[CLS] a dog . a field . flowers . [SEP]"


def test_chunk_score_is_max_over_the_chunks_tokens():
    probs = np.array([[0.1, 0.2, 0.7, 0.9, 0.05, 0.3, 0.0, 0.01, 0.0, 0.0]], np.float32)
    per_chunk, rest = chunk_scores(probs, TOKEN_CHUNK, 4)
    assert per_chunk[0].tolist() == pytest.approx([0.7, 0.3, 0.01, 0.0])  # chunk 3 has no tokens
    assert rest.tolist() == pytest.approx([0.9])


def test_entries_hand_computed():
    probs = np.array([
        [0.1, 0.2, 0.7, 0.9, 0.05, 0.3, 0.0, 0.01, 0.0, 0.0],  # chunks 0 and 1 above 0.25
        [0.5, 0.1, 0.1, 0.2, 0.1, 0.1, 0.0, 0.2, 0.0, 0.0],  # only [CLS] above: unassigned
        [0.1, 0.1, 0.1, 0.2, 0.1, 0.1, 0.0, 0.2, 0.0, 0.0],  # nothing above: dropped
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
