"""Grounded-caption text formats: Kosmos-2 tags and the Markdown-link view (builders and parsers).

`compose` writes both views of every GrIT row from the caption and its tagged spans; the trainer and
`grit inspect` read them back. A span is `(start, end, boxes)`: character offsets into the caption
(end-exclusive, non-overlapping) and the span's boxes, each either a `(ul, lr)` patch-index pair or a
normalized xyxy box (encoded with `schemas.location`, `unilm` by default).

**Kosmos-2 form** (`build_grounded_caption` / `parse_grounded_caption`), exactly as Hugging Face's
`Kosmos2Processor` writes it after tokenization (and as Kosmos-2 generates it)::

    <grounding><phrase> Two puppies</phrase><object><patch_index_0079><patch_index_1016></object> sit ...
    ... of<phrase> grass</phrase><object><patch_index_0480><patch_index_1023></delimiter_of_multi_objects/>...

The caption follows `<grounding>` behind one space (SentencePiece's word-initial space); when a phrase
begins after a space, that space moves inside `<phrase>` (`of<phrase> grass</phrase>`), as the tokenizer's
left-stripping tag tokens do. A phrase's boxes follow it in one `<object>...</object>`, joined by
`</delimiter_of_multi_objects/>`; a phrase with no box has no `<object>`. Parsing removes the tags and
strips surrounding whitespace the way transformers' `clean_text_and_extract_entities_with_bboxes` does,
so both parsers agree on everything the builder writes (tested).

The Kosmos-2 format has no escape mechanism -- transformers deletes every `<...>` it finds -- so this module
**rejects** captions it cannot write faithfully instead of escaping them: `unsafe_caption_reason` flags
any `<` (literal tags, `<3`, HTML remnants) and leading/trailing whitespace (which the parsers strip;
ingest collapses whitespace runs and strips the ends by default, so this only bites with that turned off).
`>`, brackets, emoji, right-to-left text and inner double spaces are all safe. The builder raises
`UnsafeCaptionError` (a ValueError) for such captions; the pipeline rejects those rows with reason
`unsafe_caption` (in `chunks`, again in `compose`).

**Markdown-link view** (`build_markdown_caption` / `parse_markdown_caption`)::

    [a dog](<patch_index_0288><patch_index_0990>) in a field
    [two dogs](<patch_index_0079><patch_index_1016></delimiter_of_multi_objects/><patch_index_0135><patch_index_1008>)

No `<grounding>` prefix and no moved spaces. This view **escapes** instead of rejecting: every `\\`, `[`
and `]` of the caption is written as `\\\\`, `\\[`, `\\]`, so an unescaped `[` always opens a link and an
unescaped `]` always closes one (and must be followed by `(` location tokens `)`; `()` means no box).
Any caption round-trips through this view, `<` and `](` included.

Both parsers return a `ParsedCaption` (clean caption, spans in caption order with their patch-index pairs;
`GroundedSpan.coordinates()` decodes the boxes) and raise ValueError on malformed text, so a corrupted
caption is never silently half-read. For every safe caption and valid spans,
`parse(build(caption, spans)) == (caption, sorted spans)`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import NamedTuple

from schemas.location import (
    LocationEncoder,
    check_patch_pair,
    decode_box,
    encode_box,
    location_tokens,
)

GROUNDING = "<grounding>"
PHRASE_OPEN, PHRASE_CLOSE = "<phrase>", "</phrase>"
OBJECT_OPEN, OBJECT_CLOSE = "<object>", "</object>"
DELIMITER = "</delimiter_of_multi_objects/>"

PatchPair = tuple[int, int]

_PAIR = r"<patch_index_(?:\d{4})><patch_index_(?:\d{4})>"
_PAIR_LIST = rf"{_PAIR}(?:{re.escape(DELIMITER)}{_PAIR})*"
_PAIR_CAPTURE_RE = re.compile(r"<patch_index_(\d{4})><patch_index_(\d{4})>")
# One tagged phrase and its optional object. The caption holds no `<`, so `[^<]*` is the whole phrase text.
_PHRASE_RE = re.compile(
    rf"{re.escape(PHRASE_OPEN)}([^<]*){re.escape(PHRASE_CLOSE)}"
    rf"(?:{re.escape(OBJECT_OPEN)}({_PAIR_LIST}){re.escape(OBJECT_CLOSE)})?"
)
_MD_ESCAPED = re.compile(r"[\\\[\]]")
# One step of the Markdown scanner: an escaped char, a link opening, a link closing with its boxes, or text.
_MD_TOKEN_RE = re.compile(
    rf"\\(?P<esc>[\\\[\]])|(?P<open>\[)|\]\((?P<locs>(?:{_PAIR_LIST})?)\)|(?P<text>[^\\\[\]]+)"
)


class GroundedSpan(NamedTuple):
    """A tagged caption span: character offsets (end-exclusive) and its boxes as patch-index pairs."""

    start: int
    end: int
    boxes: tuple[PatchPair, ...]

    def coordinates(self) -> tuple[tuple[float, float, float, float], ...]:
        """The boxes decoded to normalized xyxy (bin centres, or whole cells; see `schemas.location`)."""
        return tuple(decode_box(ul, lr) for ul, lr in self.boxes)


class ParsedCaption(NamedTuple):
    caption: str
    spans: tuple[GroundedSpan, ...]


class UnsafeCaptionError(ValueError):
    """The caption cannot be written in the Kosmos-2 form and parsed back unchanged."""


def unsafe_caption_reason(caption: str) -> str | None:
    """None when `caption` can be written in the grounded formats and parsed back unchanged; otherwise a
    short detail saying why not (the row is then rejected with reason `unsafe_caption`)."""
    lt = caption.find("<")
    if lt >= 0:
        m = re.match(r"<[^<>]{0,40}>?", caption[lt:])
        return f"tag-like text {m.group(0)!r} at char {lt} (the Kosmos-2 format cannot escape '<')"
    if caption[:1].isspace():
        return "leading whitespace (grounded-caption parsers strip it)"
    if caption[-1:].isspace():
        return "trailing whitespace (grounded-caption parsers strip it)"
    return None


# --- shared span handling --------------------------------------------------------------------------------


def _box_to_pair(box, encoder: LocationEncoder) -> PatchPair:
    if box is None:
        raise ValueError("a span's boxes must not contain None")
    if len(box) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in box):
        return check_patch_pair(int(box[0]), int(box[1]))
    if len(box) == 4:
        return encode_box(box, encoder)
    raise ValueError(f"a box is a (ul, lr) patch-index pair or a normalized (x1, y1, x2, y2) box, got {box!r}")


def normalize_spans(caption: str, spans: Iterable[Sequence], encoder: LocationEncoder = "unilm"
                    ) -> tuple[GroundedSpan, ...]:
    """Validate `(start, end, boxes)` spans against `caption` and return them as GroundedSpans in caption
    order, boxes encoded to patch-index pairs. ValueError for out-of-range, empty or overlapping spans."""
    out = []
    for span in spans:
        if len(span) != 3:
            raise ValueError(f"a span is (start, end, boxes), got {span!r}")
        start, end, boxes = span
        if not (isinstance(start, int) and isinstance(end, int)):
            raise ValueError(f"span offsets must be ints, got ({start!r}, {end!r})")
        if not 0 <= start < end <= len(caption):
            raise ValueError(f"span [{start}, {end}) is empty or outside the caption of {len(caption)} chars")
        if boxes is None:
            boxes = ()
        out.append(GroundedSpan(start, end, tuple(_box_to_pair(b, encoder) for b in boxes)))
    out.sort(key=lambda s: (s.start, s.end))
    for a, b in pairwise(out):
        if b.start < a.end:
            raise ValueError(f"spans [{a.start}, {a.end}) and [{b.start}, {b.end}) overlap")
    return tuple(out)


def _object_text(boxes: Sequence[PatchPair]) -> str:
    return DELIMITER.join(location_tokens(ul, lr) for ul, lr in boxes)


def _pairs(locs: str) -> tuple[PatchPair, ...]:
    return tuple(check_patch_pair(int(a), int(b)) for a, b in _PAIR_CAPTURE_RE.findall(locs))


# --- Kosmos-2 form --------------------------------------------------------------------------------------


def build_grounded_caption(caption: str, spans: Iterable[Sequence], *, encoder: LocationEncoder = "unilm") -> str:
    """The Kosmos-2 tagged text of `caption` with `spans` as phrases. Raises UnsafeCaptionError for a caption
    `unsafe_caption_reason` flags, ValueError for bad spans or boxes (including a span that begins or ends
    with whitespace, which the Kosmos-2 parsers would strip)."""
    reason = unsafe_caption_reason(caption)
    if reason:
        raise UnsafeCaptionError(f"caption cannot be written in the Kosmos-2 form: {reason}")
    norm = normalize_spans(caption, spans, encoder)
    text = " " + caption  # the word-initial space of the first word; offsets below are into `text`
    parts = [GROUNDING]
    pos = 0
    for span in norm:
        piece = caption[span.start:span.end]
        if piece != piece.strip():
            raise ValueError(f"span [{span.start}, {span.end}) {piece!r} begins or ends with whitespace")
        start, end = span.start + 1, span.end + 1
        if text[start - 1] == " ":  # the space before a phrase goes inside the tag, as the tokenizer writes it
            start -= 1
        parts.append(text[pos:start])
        parts.append(PHRASE_OPEN + text[start:end] + PHRASE_CLOSE)
        if span.boxes:
            parts.append(OBJECT_OPEN + _object_text(span.boxes) + OBJECT_CLOSE)
        pos = end
    parts.append(text[pos:])
    return "".join(parts)


def parse_grounded_caption(text: str) -> ParsedCaption:
    """Kosmos-2 tagged text -> clean caption and spans. ValueError on anything but `<grounding>` (leading),
    `<phrase>...</phrase>` optionally followed by `<object>...</object>`, and tag-free text."""
    body = text[len(GROUNDING):] if text.startswith(GROUNDING) else text
    clean: list[str] = []
    length = 0
    raw_spans: list[tuple[int, int, tuple[PatchPair, ...]]] = []
    pos = 0
    for m in _PHRASE_RE.finditer(body):
        between = body[pos:m.start()]
        _check_plain(between, text)
        clean.append(between)
        length += len(between)
        phrase, locs = m.group(1), m.group(2)
        if not phrase.strip():
            raise ValueError(f"empty phrase at char {m.start()} of {text!r}")
        lead = len(phrase) - len(phrase.lstrip())
        trail = len(phrase) - len(phrase.rstrip())
        raw_spans.append((length + lead, length + len(phrase) - trail, _pairs(locs) if locs else ()))
        clean.append(phrase)
        length += len(phrase)
        pos = m.end()
    _check_plain(body[pos:], text)
    clean.append(body[pos:])
    joined = "".join(clean)
    shift = len(joined) - len(joined.lstrip())
    caption = joined.strip()
    return ParsedCaption(caption, tuple(GroundedSpan(s - shift, e - shift, b) for s, e, b in raw_spans))


def _check_plain(segment: str, text: str) -> None:
    lt = segment.find("<")
    if lt >= 0:
        m = re.match(r"<[^<>]{0,40}>?", segment[lt:])
        raise ValueError(f"unexpected {m.group(0)!r} in grounded caption {text[:80]!r}: only <grounding>, "
                         f"<phrase>..</phrase> and <object>..</object> may appear")


# --- Markdown-link view ---------------------------------------------------------------------------------


def escape_markdown(text: str) -> str:
    """Backslash-escape `\\`, `[` and `]`."""
    return _MD_ESCAPED.sub(lambda m: "\\" + m.group(0), text)


def build_markdown_caption(caption: str, spans: Iterable[Sequence], *, encoder: LocationEncoder = "unilm") -> str:
    """`[span](<patch_index_a><patch_index_b>)` links in `caption`; brackets and backslashes escaped.
    Several boxes of one span are joined by `</delimiter_of_multi_objects/>` inside the parentheses."""
    parts = []
    pos = 0
    for span in normalize_spans(caption, spans, encoder):
        parts.append(escape_markdown(caption[pos:span.start]))
        parts.append(f"[{escape_markdown(caption[span.start:span.end])}]({_object_text(span.boxes)})")
        pos = span.end
    parts.append(escape_markdown(caption[pos:]))
    return "".join(parts)


def parse_markdown_caption(text: str) -> ParsedCaption:
    """Markdown-link view -> clean caption and spans. ValueError on a bad escape, nested or unclosed link,
    or a `]` not followed by `(` location tokens `)`."""
    clean: list[str] = []
    length = 0
    spans: list[GroundedSpan] = []
    link_start: int | None = None
    pos = 0
    while pos < len(text):
        m = _MD_TOKEN_RE.match(text, pos)
        if m is None:
            what = "a lone backslash" if text[pos] == "\\" else "']' not followed by (location tokens)"
            raise ValueError(f"bad Markdown caption at char {pos} ({what}): {text[:80]!r}")
        if m.group("open") is not None:
            if link_start is not None:
                raise ValueError(f"nested '[' at char {pos} in Markdown caption {text[:80]!r}")
            link_start = length
        elif m.group("locs") is not None:
            if link_start is None or link_start == length:
                raise ValueError(f"']' without a non-empty '[' link at char {pos} in {text[:80]!r}")
            spans.append(GroundedSpan(link_start, length, _pairs(m.group("locs"))))
            link_start = None
        else:
            piece = m.group("esc") if m.group("esc") is not None else m.group("text")
            clean.append(piece)
            length += len(piece)
        pos = m.end()
    if link_start is not None:
        raise ValueError(f"unclosed '[' in Markdown caption {text[:80]!r}")
    return ParsedCaption("".join(clean), tuple(spans))
