"""Grounding prompts: a caption's chunks joined into one text prompt, and the token -> chunk map.

GroundingDINO scores every (box, text token) pair. We build one prompt per image with all of its chunks,
`"a dog . a field . flowers ."` (the model's training format: phrases separated by " . "), remember each
chunk's char span inside the prompt, and map the tokenizer's offsets back to chunks: token t belongs to
chunk j when its characters lie inside chunk j's span; separators and special tokens map to -1. A box's
score for a chunk is then the max over that chunk's tokens (`postprocess.chunk_scores`).

A prompt longer than the text encoder's token budget (256 for GroundingDINO, special tokens included)
is split into several passes, each holding whole chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

PHRASE_END = " ."


@dataclass(frozen=True)
class PromptPass:
    """One forward pass's prompt: `text`, which chunks it holds (indices into the caption's chunk list),
    and each of those chunks' (start, end) char span inside `text`."""

    text: str
    chunk_ids: tuple[int, ...]
    char_spans: tuple[tuple[int, int], ...]


def clean_phrase(phrase: str) -> str:
    """Whitespace runs (newlines, tabs) collapsed to one space; the detector never sees layout."""
    return " ".join(phrase.split())


def build_prompt(phrases: Sequence[str], chunk_ids: Sequence[int] | None = None) -> PromptPass:
    """`["a dog", "a field"]` -> `"a dog . a field ."` with each phrase's span. Empty phrases are left out
    (their chunk gets no tokens and so no score)."""
    ids = range(len(phrases)) if chunk_ids is None else chunk_ids
    text, kept, spans = "", [], []
    for cid, phrase in zip(ids, phrases, strict=True):
        phrase = clean_phrase(phrase)
        if not phrase:
            continue
        if text:
            text += " "
        spans.append((len(text), len(text) + len(phrase)))
        kept.append(int(cid))
        text += phrase + PHRASE_END
    return PromptPass(text, tuple(kept), tuple(spans))


def split_prompt(phrases: Sequence[str], count_tokens: Callable[[str], int], budget: int,
                 special_tokens: int = 2) -> list[PromptPass]:
    """Pack whole chunks, in order, into as few passes as fit `budget` tokens each (`special_tokens`,
    e.g. [CLS] and [SEP], counted in). `count_tokens(text)` counts a text's tokens without specials.

    A single chunk longer than the budget gets a pass of its own (the tokenizer truncates it, so only
    its first tokens are scored)."""
    room = budget - special_tokens
    if room <= 0:
        raise ValueError(f"token budget {budget} leaves no room after {special_tokens} special tokens")
    passes: list[PromptPass] = []
    group: list[int] = []
    used = 0
    for cid, phrase in enumerate(phrases):
        phrase = clean_phrase(phrase)
        if not phrase:
            continue
        need = count_tokens(phrase + PHRASE_END)
        if group and used + need > room:
            passes.append(build_prompt([phrases[i] for i in group], group))
            group, used = [], 0
        group.append(cid)
        used += need
    if group:
        passes.append(build_prompt([phrases[i] for i in group], group))
    return passes


def token_chunk_map(offsets: Sequence[tuple[int, int]], prompt: PromptPass) -> np.ndarray:
    """Chunk index (into the caption's chunks) of each token, -1 for separators, special and padding
    tokens. `offsets` are the tokenizer's (start, end) char offsets of each token in `prompt.text`."""
    out = np.full(len(offsets), -1, np.int32)
    if not prompt.char_spans:
        return out
    starts = np.array([s for s, _ in prompt.char_spans])
    ends = np.array([e for _, e in prompt.char_spans])
    ids = np.array(prompt.chunk_ids)
    for t, (s, e) in enumerate(offsets):
        if e <= s:  # special or padding token: empty offsets
            continue
        j = int(np.searchsorted(starts, s, side="right")) - 1
        if j >= 0 and s < ends[j]:
            out[t] = ids[j]
    return out
