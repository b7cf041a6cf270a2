"""Grounding prompts: the text a GroundingDINO-style model reads for one image, and which of its tokens
belong to which chunk.

Two prompt forms (`DetectConfig.prompt`):

- `caption` (the default): the caption itself, as GLIP's phrase grounding (the paper's detector) and
  GroundingDINO's token-span mode feed it: whitespace runs collapsed to one space, lower-cased like
  GroundingDINO's `caption.lower()` (here character by character, so that every chunk's char span maps
  exactly into the normalized text), ending in " ." (a caption already ending in "." keeps it, as
  GroundingDINO's demo does; the tokens are the same). Each chunk is found from its char span, so it is
  encoded in its caption's context ("a bat" beside "a man swinging" or beside "a cave").
- `chunks`: the chunks joined as `"a dog . a field . flowers ."`, GroundingDINO's class-list form. Its
  text encoder treats " ." as an attention boundary, so each chunk is encoded without context.

The tokens of a chunk (`positive_map`) are those whose characters overlap the chunk's char span: from the
token holding the span's first character to the one holding its last, as GroundingDINO's
`create_positive_map_from_span` and GLIP's positive map take them (`char_to_token` of both ends). Special
tokens ([CLS], [SEP], padding: empty offsets) and the " ." separators never belong to a chunk.

The text encoder's budget (256 tokens for GroundingDINO and GLIP, [CLS]/[SEP] included; `max_text_tokens`
lowers it). The references truncate a longer text, silently losing the chunks past the cut. Here:

- a caption over the budget is scored in **windows**: contiguous stretches of the caption, each holding as
  many tokens as the budget allows and ending in " .". The first window starts at the first chunk; each
  next one at the first chunk not wholly inside an earlier window, moved back when that would run past
  the caption's end (so the last window ends at the caption's end, with left context instead). Every
  chunk is scored in exactly one window, with as much of its caption around it as fits;
- a chunk list over the budget is split into passes of whole chunks;
- a single chunk longer than the budget cannot be scored the way the references score chunks (they skip a
  chunk whose last token was cut off): it gets no pass and is reported in `Passes.too_long`; the detector
  counts and logs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

PHRASE_END = " ."

Offsets = list[tuple[int, int]]


@dataclass(frozen=True)
class PromptPass:
    """One forward pass's prompt: `text`, which chunks it holds (indices into the caption's chunk list),
    and each of those chunks' (start, end) char span inside `text`."""

    text: str
    chunk_ids: tuple[int, ...]
    char_spans: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Passes:
    """The passes of one image, and the chunks too long for any pass (not scored)."""

    passes: list[PromptPass]
    too_long: tuple[int, ...] = field(default=())


def clean_phrase(phrase: str) -> str:
    """Whitespace runs (newlines, tabs) collapsed to one space; the detector never sees layout."""
    return " ".join(phrase.split())


# --- the caption form ---------------------------------------------------------------------------------


def normalize_caption(caption: str) -> tuple[str, list[int]]:
    """`caption` -> (text, where): whitespace runs collapsed to one space and trimmed, lower-cased, ending
    in " ." unless it already ends in "."; `where[i]` is the position in `text` of the caption's
    character i (`where[len(caption)]` is the end of the caption's text), so a span (s, e) of the caption
    is `(where[s], where[e])` in `text`. An empty caption gives ""."""
    out: list[str] = []
    where: list[int] = []
    length = 0
    space = False  # a whitespace run is pending
    for ch in caption:
        if ch.isspace():
            space = length > 0
            where.append(length)
            continue
        if space:
            out.append(" ")
            length += 1
            space = False
        where.append(length)
        low = ch.lower()  # one character may lower to two ("İ"): positions follow the text
        out.append(low)
        length += len(low)
    where.append(length)
    text = "".join(out)
    if text and not text.endswith("."):
        text += PHRASE_END
    return text, where


def caption_passes(caption: str, spans: Sequence[tuple[int, int]], tokenize: Callable[[str], Offsets],
                   budget: int, special_tokens: int = 2) -> Passes:
    """The caption form's passes (module docstring): one when the normalized caption fits `budget` tokens
    (`special_tokens` counted in), else windows. `tokenize(text)` gives each token's (start, end) char
    offsets in `text`, special tokens left out. Chunks whose span holds no text get no score."""
    room = _room(budget, special_tokens)
    text, where = normalize_caption(caption)
    chunks: list[tuple[int, int, int]] = []  # (chunk id, start, end) in `text`
    for j, (s, e) in enumerate(spans):
        if 0 <= s < e <= len(caption):
            a, b = where[s], where[e]
            if text[a:b].strip():
                chunks.append((j, a, b))
    if not chunks:
        return Passes([])
    offsets = tokenize(text)
    if len(offsets) <= room:
        return Passes([_caption_pass(text, 0, chunks)])
    return _windows(text, caption_end=where[len(caption)], offsets=offsets, chunks=chunks,
                    tokenize=tokenize, room=room)


def _caption_pass(text: str, start: int, chunks: Sequence[tuple[int, int, int]]) -> PromptPass:
    ordered = sorted(chunks, key=lambda c: (c[1], c[2], c[0]))
    return PromptPass(text, tuple(j for j, _, _ in ordered), tuple((a - start, b - start) for _, a, b in ordered))


def _windows(text: str, *, caption_end: int, offsets: Offsets, chunks: list[tuple[int, int, int]],
             tokenize: Callable[[str], Offsets], room: int) -> Passes:
    off = np.asarray(offsets, np.int64).reshape(-1, 2)
    real = off[:, 1] > off[:, 0]
    body = int(np.count_nonzero(real & (off[:, 0] < caption_end)))  # tokens of the caption, not its " ."
    span_tokens = {}
    for j, a, b in chunks:
        inside = np.flatnonzero(real & (off[:, 0] < b) & (off[:, 1] > a))
        if len(inside):
            span_tokens[j] = (int(inside[0]), int(inside[-1]))
    todo = sorted(span_tokens, key=lambda j: (*span_tokens[j], j))
    by_id = {j: (a, b) for j, a, b in chunks}
    passes: list[PromptPass] = []
    too_long: list[int] = []
    placed: set[int] = set()
    for j0 in todo:
        if j0 in placed:
            continue
        first, last = span_tokens[j0]
        window = _fit_window(text, off, body, first, last, tokenize, room)
        if window is None:
            too_long.append(j0)
            placed.add(j0)
            continue
        t0, t1, wtext = window
        members = [j for j in todo if j not in placed and span_tokens[j][0] >= t0 and span_tokens[j][1] < t1]
        placed.update(members)
        start = int(off[t0, 0])
        passes.append(_caption_pass(wtext, start, [(j, *by_id[j]) for j in members]))
    return Passes(passes, tuple(too_long))


def _fit_window(text: str, off: np.ndarray, body: int, first: int, last: int,
                tokenize: Callable[[str], Offsets], room: int) -> tuple[int, int, str] | None:
    """Token range [t0, t1) of the caption holding tokens first..last, as long as fits, and its text
    (ending in " ."); None when even the chunk alone does not fit."""
    suffix = len(tokenize(PHRASE_END))
    width = room - suffix
    if last - first + 1 > width:
        return None
    t0 = min(first, max(0, body - width))
    t1 = min(body, t0 + width)
    while True:
        chars = text[int(off[t0, 0]):int(off[t1 - 1, 1])]
        wtext = chars if chars.endswith(".") else chars + PHRASE_END
        if len(tokenize(wtext)) <= room:
            return t0, t1, wtext
        # cutting a word can re-tokenize into more pieces: give up context, never the chunk
        if t1 - 1 > last:
            t1 -= 1
        elif t0 < first:
            t0 += 1
        else:
            return None


# --- the chunks form ----------------------------------------------------------------------------------


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
                 special_tokens: int = 2) -> Passes:
    """The chunks form's passes: whole chunks, in order, packed into as few passes as fit `budget`
    tokens each (`special_tokens`, e.g. [CLS] and [SEP], counted in). `count_tokens(text)` counts a
    text's tokens without specials. A chunk longer than the budget by itself gets no pass (`too_long`)."""
    room = _room(budget, special_tokens)
    passes: list[PromptPass] = []
    too_long: list[int] = []
    group: list[int] = []
    used = 0
    for cid, phrase in enumerate(phrases):
        phrase = clean_phrase(phrase)
        if not phrase:
            continue
        need = count_tokens(phrase + PHRASE_END)
        if need > room:
            too_long.append(cid)
            continue
        if group and used + need > room:
            passes.append(build_prompt([phrases[i] for i in group], group))
            group, used = [], 0
        group.append(cid)
        used += need
    if group:
        passes.append(build_prompt([phrases[i] for i in group], group))
    return Passes(passes, tuple(too_long))


def _room(budget: int, special_tokens: int) -> int:
    room = budget - special_tokens
    if room <= 1:
        raise ValueError(f"token budget {budget} leaves no room for a chunk and its ' .' after "
                         f"{special_tokens} special tokens")
    return room


# --- tokens -> chunks ---------------------------------------------------------------------------------


def positive_map(offsets: Sequence[tuple[int, int]], prompt: PromptPass, n_chunks: int) -> np.ndarray:
    """(n_chunks, tokens) bool: token t belongs to chunk j when its characters overlap chunk j's span in
    `prompt.text` (a token may belong to two overlapping chunks). `offsets` are the tokenizer's (start,
    end) char offsets of each token; special and padding tokens (empty offsets) belong to none."""
    out = np.zeros((n_chunks, len(offsets)), bool)
    if not len(offsets):
        return out
    off = np.asarray(offsets, np.int64).reshape(-1, 2)
    real = off[:, 1] > off[:, 0]
    for cid, (s, e) in zip(prompt.chunk_ids, prompt.char_spans, strict=True):
        out[cid] |= real & (off[:, 0] < e) & (off[:, 1] > s)
    return out
