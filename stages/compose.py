"""The `compose` stage: chunk-box pairs -> the final GrIT columns and the two grounded-caption views.

Last stage of the pipeline (ingest -> chunks -> detect -> select -> compose). It reads the caption, the
`chunks` of the chunks stage and the `pairs` that `select` kept, and writes, per row:

- `noun_chunks`: one `[start, end, x1, y1, x2, y2, score]` per (chunk, box) pair, and `ref_exps`, aligned
  1:1 with it: the same box and score on the chunk's referring-expression span. As in the GRIT-20M release,
  entries are ordered by score, highest first (ties: chunk offsets, then box corners).
- `grounded_caption` (Kosmos-2 tags) and `markdown_caption` (Markdown links), through
  `schemas.grounded_text`, with the boxes quantized by the configured location encoder.

Which spans get tagged follows the paper (section 2, step 2): with `containment_filter` on, the tagged spans
are the referring expressions not contained in another expression of the row ("a dog in a field of flowers"
swallows "a field of flowers" and "flowers"). Expressions with the same span (several boxes, or several
chunks expanding alike) become one phrase with several boxes. Two remaining expressions that cross (overlap
without nesting) cannot both be tagged: the one with the higher best score wins (ties: earlier, then shorter
span). Containment is decided first, over all expressions; crossings are resolved among the survivors. With
the filter off, the noun-chunk spans are tagged instead (they never nest; the same overlap rule guards it).

Every written caption is parsed back; a row whose views do not give back exactly its caption and spans is
rejected (`unsafe_caption`) rather than emitted. Bad pairs (a null pair or chunk index, a chunk index out
of range, a box or score that fails `schemas.boxes.check_boxes`, checked for the whole batch at once; corners
within its float-noise tolerance are clipped into [0, 1]) reject the row with `bad_detection`; null chunks
and chunks whose offsets are null or do not fit the caption with `bad_chunk`; a row without pairs with
`no_box`. Other rows are untouched.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from schemas.boxes import BoxCheck, check_boxes
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
from schemas.location import encode_box
from schemas.rows import RejectReason
from schemas.tables import GRIT_FIELDS, GRIT_SCHEMA, INGEST_COLUMNS, PRODUCED_COLUMNS, SOURCE_PREFIX
from stages.base import Execution, Stage, StageConfig, StageResult
from stages.list_columns import ListEntries


class ComposeConfig(StageConfig):
    """How compose turns pairs into GrIT rows."""

    containment_filter: bool = Field(
        True,
        description="Tag the referring expressions not contained in another expression (the paper's rule). "
        "Off: tag the noun-chunk spans instead.",
    )
    location_encoder: Literal["unilm", "hf"] = Field(
        "unilm",
        description="Box -> patch-index rule: 'unilm' (official Kosmos-2 training code: floor both corners) or "
        "'hf' (transformers: bottom-right ceil(v*32 - 1)). They differ only on exact cell edges.",
    )


class _Reject(Exception):
    def __init__(self, reason: RejectReason, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def passthrough_columns(names: list[str]) -> list[str]:
    """Source columns carried into the GrIT shards: everything that is not a pipeline column, minus the
    `src_`-prefixed source columns (consumed upstream, e.g. by the replay detector)."""
    pipeline = set(INGEST_COLUMNS) | set(PRODUCED_COLUMNS) | {f.name for f in GRIT_FIELDS}
    return [n for n in names if n not in pipeline and not n.startswith(SOURCE_PREFIX)]


class ComposeStage(Stage[ComposeConfig]):
    name: ClassVar[str] = "compose"
    version: ClassVar[int] = 2  # v2: boxes checked by schemas.boxes (bad_detection details reworded)
    Config: ClassVar[type[StageConfig]] = ComposeConfig
    Execution: ClassVar[type[Execution]] = Execution
    output_schema: ClassVar[pa.Schema] = GRIT_SCHEMA  # followed by the passthrough columns, in input order

    def process_batch(self, table: pa.Table) -> StageResult:
        rejects = self.rejects()
        columns = {name: table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows
                   for name in ("key", "url", "caption", "width", "height", "chunks", "pairs")}
        boxes, first_pair = _check_pairs(table)
        kept: list[int] = []
        out: dict[str, list] = {n: [] for n in ("noun_chunks", "ref_exps", "grounded_caption", "markdown_caption")}
        for i, key in enumerate(columns["key"]):
            try:
                noun_chunks, ref_exps, grounded, markdown = self.compose_row(
                    columns["caption"][i], columns["chunks"][i] or [], columns["pairs"][i] or [],
                    boxes, int(first_pair[i]))
            except _Reject as r:
                rejects.add(key, r.reason, r.detail)
                continue
            kept.append(i)
            out["noun_chunks"].append(noun_chunks)
            out["ref_exps"].append(ref_exps)
            out["grounded_caption"].append(grounded)
            out["markdown_caption"].append(markdown)

        take = pa.array(kept, pa.int64())
        arrays = []
        for field in GRIT_FIELDS:
            if field.name in out:
                arrays.append(pa.array(out[field.name], field.type))
            else:
                arrays.append(pa.array([columns[field.name][i] for i in kept], field.type))
        passthrough = passthrough_columns(table.column_names)
        fields = list(GRIT_FIELDS) + [table.schema.field(n) for n in passthrough]
        arrays += [table.column(n).take(take) for n in passthrough]
        return StageResult(pa.Table.from_arrays(arrays, schema=pa.schema(fields)), rejects.table())

    # --- one row ----------------------------------------------------------------------------------------

    def compose_row(self, caption: str | None, chunks: list[dict], pairs: list[dict], boxes: BoxCheck,
                    first: int) -> tuple[list[list[float]], list[list[float]], str, str]:
        """(noun_chunks, ref_exps, grounded_caption, markdown_caption) of one row; raises _Reject.
        `boxes` is the batch's pair check (`_check_pairs`); the row's pairs are its entries from `first` on."""
        if not caption:
            raise _Reject(RejectReason.EMPTY_CAPTION, "caption is empty or null")
        if not pairs:
            raise _Reject(RejectReason.NO_BOX, "no chunk-box pair")
        reason = unsafe_caption_reason(caption)
        if reason:
            raise _Reject(RejectReason.UNSAFE_CAPTION, reason)

        entries = []  # (sort key, chunk, box, score)
        for p, pair in enumerate(pairs):
            if pair is None or pair["chunk"] is None:
                raise _Reject(RejectReason.BAD_DETECTION, f"pair {p} is null" if pair is None
                              else f"pair {p} has a null chunk index")
            c = pair["chunk"]
            if not 0 <= c < len(chunks):
                raise _Reject(RejectReason.BAD_DETECTION, f"pair {p} refers to chunk {c}; the row has {len(chunks)}")
            chunk = self._check_chunk(chunks[c], c, len(caption))
            if not boxes.ok[first + p]:
                corners = tuple(pair[k] for k in ("x1", "y1", "x2", "y2"))
                raise _Reject(RejectReason.BAD_DETECTION, f"pair {p}: {boxes.describe(first + p)} "
                              f"(box {corners}, score {pair['score']})")
            box = tuple(float(v) for v in boxes.clipped[first + p])
            score = pair["score"]
            entries.append(((-score, chunk["start"], chunk["end"], *box, c), chunk, box, score))
        entries.sort(key=lambda e: e[0])

        noun_chunks = [[float(ch["start"]), float(ch["end"]), *box, score] for _, ch, box, score in entries]
        ref_exps = [[float(ch["expr_start"]), float(ch["expr_end"]), *box, score] for _, ch, box, score in entries]

        spans = self._tagged_spans(entries)
        try:
            grounded = build_grounded_caption(caption, spans)
            markdown = build_markdown_caption(caption, spans)
        except UnsafeCaptionError as e:
            raise _Reject(RejectReason.UNSAFE_CAPTION, str(e)) from None
        except ValueError as e:
            raise _Reject(RejectReason.BAD_CHUNK, f"cannot tag spans: {e}") from None
        expected = ParsedCaption(caption, tuple(spans))
        for view, text, parse in (("grounded", grounded, parse_grounded_caption),
                                  ("markdown", markdown, parse_markdown_caption)):
            try:
                got = parse(text)
            except ValueError as e:
                raise _Reject(RejectReason.UNSAFE_CAPTION, f"{view} caption does not parse back: {e}") from None
            if got != expected:
                raise _Reject(RejectReason.UNSAFE_CAPTION, f"{view} caption does not round-trip: {text[:120]!r}")
        return noun_chunks, ref_exps, grounded, markdown

    def _tagged_spans(self, entries: list) -> list[GroundedSpan]:
        """Group the score-ordered entries by tagged span, apply containment and crossing rules, and return
        the kept spans in caption order with their boxes encoded (best box first)."""
        s_key, e_key = ("expr_start", "expr_end") if self.config.containment_filter else ("start", "end")
        groups: dict[tuple[int, int], list] = {}
        for _, chunk, box, score in entries:  # score order, so each group's first box is its best
            groups.setdefault((chunk[s_key], chunk[e_key]), []).append((box, score))
        spans = sorted(groups)
        if self.config.containment_filter:
            spans = [(s, e) for s, e in spans
                     if not any(o != (s, e) and o[0] <= s and e <= o[1] for o in spans)]
        accepted: list[tuple[int, int]] = []
        for s, e in sorted(spans, key=lambda se: (-groups[se][0][1], se[0], se[1] - se[0])):
            if all(e <= a_s or a_e <= s for a_s, a_e in accepted):
                accepted.append((s, e))
        encoder = self.config.location_encoder
        return [GroundedSpan(s, e, tuple(encode_box(box, encoder) for box, _ in groups[(s, e)]))
                for s, e in sorted(accepted)]

    @staticmethod
    def _check_chunk(chunk: dict | None, index: int, n: int) -> dict:
        if chunk is None:
            raise _Reject(RejectReason.BAD_CHUNK, f"chunk {index} is null")
        s, e, xs, xe = chunk["start"], chunk["end"], chunk["expr_start"], chunk["expr_end"]
        if None in (s, e, xs, xe):
            raise _Reject(RejectReason.BAD_CHUNK, f"chunk {index} has a null offset")
        if not (0 <= s < e <= n and 0 <= xs <= s and e <= xe <= n):
            raise _Reject(RejectReason.BAD_CHUNK, f"chunk {index} [{s}, {e}) with expression [{xs}, {xe}) does not "
                          f"fit a caption of {n} chars")
        return chunk


def _check_pairs(table: pa.Table) -> tuple[BoxCheck, np.ndarray]:
    """The box check of every pair of the batch, and per row the index of its first pair in it."""
    n = table.num_rows
    if "pairs" not in table.column_names:
        return check_boxes(np.zeros((0, 4)), np.zeros(0)), np.zeros(n, np.int64)
    pairs = ListEntries.of(table["pairs"])
    xyxy = np.stack([pairs.field(k) for k in ("x1", "y1", "x2", "y2")], axis=1).reshape(-1, 4)
    per_row = np.bincount(pairs.row, minlength=n)
    return check_boxes(xyxy, pairs.field("score")), np.r_[0, np.cumsum(per_row)[:-1]].astype(np.int64)
