"""Terminal rendering of `grit inspect` with rich: one table per row, nested tables for list columns.

Every caption, key, URL and detail is untrusted web text: it goes in as a `rich.text.Text`, never as
markup, so `[bold]` or `[/]` in web captions prints literally, and through `schemas.display.display_text`
first, so control characters (terminal escape sequences) and bidirectional overrides print as visible
escapes (`\x1b`, `\u202e`) instead of acting on the terminal.

At the detect stage each candidate also shows what `select` does with it under the run's config (the
`select_fates` that `inspect_rows` attaches): kept, or which rule removed it -- for NMS, the surviving pair
whose box overlapped it.
"""

from __future__ import annotations

import pyarrow as pa
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from grit_pipeline.report.boxes import candidate_boxes, chunk_color, chunk_texts
from grit_pipeline.report.row_trace import RowTrace
from schemas.display import display_text

FATE_WORDS = {"kept": "kept", "malformed": "malformed", "unassigned": "no chunk", "below_min_score": "<= min_score",
              "over_max_box_area": "> max_box_area", "duplicate": "repeated entry", "max_pairs": "over max_pairs"}


def untrusted(value, style: str = "") -> Text:
    """Untrusted text (caption, key, URL, reject detail) as a rich Text that is safe to print."""
    return Text(display_text(value), style=style)


def _box(x1: float, y1: float, x2: float, y2: float) -> str:
    return f"{x1:.3f} {y1:.3f} {x2:.3f} {y2:.3f}"


def highlighted_caption(caption: str, chunks: list[dict] | None) -> Text:
    """The caption with each noun chunk in its colour; escaping may lengthen pieces, so the Text is built
    piece by piece instead of styled at caption offsets."""
    style = [""] * (len(caption) + 1)
    for i, c in enumerate(chunks or []):
        if 0 <= c["start"] < c["end"] <= len(caption):
            style[c["start"]:c["end"]] = [f"bold {chunk_color(i)}"] * (c["end"] - c["start"])
    text = Text()
    start = 0
    for pos in range(1, len(caption) + 1):
        if pos == len(caption) or style[pos] != style[start]:
            text.append(display_text(caption[start:pos]), style=style[start])
            start = pos
    return text


def _chunks_table(caption: str, chunks: list[dict]) -> Table:
    t = Table(show_edge=False, pad_edge=False, box=None, header_style="bold dim")
    for col in ("#", "chunk", "span", "expression", "conj"):
        t.add_column(col)
    for i, c in enumerate(chunks):
        t.add_row(Text(str(i), style=chunk_color(i)), untrusted(caption[c["start"]:c["end"]]),
                  f"{c['start']}-{c['end']}", untrusted(caption[c["expr_start"]:c["expr_end"]]),
                  "yes" if c["has_conj"] else "")
    return t


def _fate(fate, texts: list[str]) -> Text:
    if fate.status == "nms":
        by = texts[fate.by_chunk] if 0 <= fate.by_chunk < len(texts) else f"chunk {fate.by_chunk}"
        return (Text(f"NMS: overlaps box {fate.by_box} ", style="yellow") + untrusted(by, chunk_color(fate.by_chunk))
                + Text(f" (IoU {fate.iou:.2f})", style="yellow"))
    word = FATE_WORDS.get(fate.status, fate.status) + (f" ({fate.detail})" if fate.detail else "")
    return Text(word, style="green" if fate.status == "kept" else "dim")


def _candidates_table(candidates: list[dict], texts: list[str], limit: int, fates: list | None = None,
                      rule: str = "") -> Group:
    t = Table(show_edge=False, pad_edge=False, box=None, header_style="bold dim")
    columns = ["box", "chunk", "score", "box_score", "x1 y1 x2 y2"] + (["select"] if fates is not None else [])
    for col in columns:
        t.add_column(col, justify="right" if col in ("box", "score", "box_score") else "left")
    with_fates = list(zip(candidates, fates if fates is not None else [None] * len(candidates), strict=True))
    ordered = sorted(with_fates, key=lambda cf: (-cf[0]["score"], cf[0]["box"], cf[0]["chunk"]))
    for c, fate in ordered[:limit]:
        name = texts[c["chunk"]] if 0 <= c["chunk"] < len(texts) else "(no chunk)"
        cells = [str(c["box"]), untrusted(name, chunk_color(c["chunk"])), f"{c['score']:.3f}",
                 f"{c['box_score']:.3f}", _box(c["x1"], c["y1"], c["x2"], c["y2"])]
        t.add_row(*cells, *([_fate(fate, texts)] if fate is not None else []))
    boxes = len(candidate_boxes(candidates, texts))
    note = Text(f"{len(candidates)} chunk-box scores over {boxes} boxes (before threshold and NMS)"
                + (f"; best {limit} shown" if len(candidates) > limit else "")
                + (f"; select column: {rule}" if fates is not None and rule else ""), style="dim")
    return Group(t, note)


def _pairs_table(pairs: list[dict], texts: list[str]) -> Table:
    t = Table(show_edge=False, pad_edge=False, box=None, header_style="bold dim")
    for col in ("chunk", "score", "x1 y1 x2 y2"):
        t.add_column(col, justify="right" if col == "score" else "left")
    for p in pairs:
        name = texts[p["chunk"]] if 0 <= p["chunk"] < len(texts) else f"chunk {p['chunk']}"
        t.add_row(untrusted(name, chunk_color(p["chunk"])), f"{p['score']:.3f}",
                  _box(p["x1"], p["y1"], p["x2"], p["y2"]))
    return t


def _grit_table(caption: str, noun_chunks: list, ref_exps: list, chunks: list[dict] | None) -> Table:
    index = {(c["start"], c["end"]): i for i, c in enumerate(chunks or [])}
    t = Table(show_edge=False, pad_edge=False, box=None, header_style="bold dim")
    for col in ("noun chunk", "referring expression", "score", "x1 y1 x2 y2"):
        t.add_column(col, justify="right" if col == "score" else "left", no_wrap=col == "x1 y1 x2 y2")
    for nc, ex in zip(noun_chunks, ref_exps, strict=True):
        color = chunk_color(index.get((int(nc[0]), int(nc[1])), -1))
        t.add_row(untrusted(caption[int(nc[0]):int(nc[1])], color), untrusted(caption[int(ex[0]):int(ex[1])]),
                  f"{nc[6]:.3f}", _box(*nc[2:6]))
    return t


def render_row(trace: RowTrace, stage: str, max_candidates: int = 20) -> Table:
    row = trace.row
    caption = row.get("caption") or ""
    chunks = row.get("chunks")
    texts = chunk_texts(caption, chunks)
    t = Table(title=untrusted(f"{trace.key}  ·  shard {trace.shard}  ·  {stage}", "bold"), show_header=False,
              title_justify="left", expand=False)
    t.add_column("field", style="dim", no_wrap=True)
    t.add_column("value", overflow="fold")
    t.add_row("caption", highlighted_caption(caption, chunks))
    if row.get("image_ref") or row.get("width"):
        size = f"{row.get('width')}x{row.get('height')}" if row.get("width") else "size unknown"
        t.add_row("image", untrusted(f"{row.get('image_ref') or '(none)'}  ({size})"))
    if row.get("url"):
        t.add_row("url", untrusted(row["url"]))
    if chunks is not None and stage != "ingest":
        t.add_row("chunks", _chunks_table(caption, chunks))
    if stage in trace.reached:
        if stage == "detect":
            t.add_row("candidates", _candidates_table(row.get("candidates") or [], texts, max_candidates,
                                                      row.get("select_fates"), row.get("select_rule", "")))
        elif stage == "select":
            t.add_row("pairs", _pairs_table(row.get("pairs") or [], texts))
        elif stage == "compose":
            t.add_row("boxes", _grit_table(caption, row.get("noun_chunks") or [], row.get("ref_exps") or [], chunks))
            t.add_row("grounded", untrusted(row.get("grounded_caption") or ""))
            t.add_row("markdown", untrusted(row.get("markdown_caption") or ""))
    if trace.dropped:
        d = trace.dropped
        t.add_row("dropped", untrusted(f"at {d['stage']}: {d['reason']}" + (f" — {d['detail']}" if d["detail"] else ""),
                                       "bold red"))
    return t


def render_rejects(table: pa.Table, stage: str) -> Table:
    t = Table(title=untrusted(f"rejects of {stage}", "bold"), title_justify="left")
    for col in ("key", "shard", "reason", "detail", "caption"):
        t.add_column(col, justify="right" if col == "shard" else "left", overflow="fold")
    for r in table.to_pylist():
        t.add_row(untrusted(r["key"]), str(r["shard"]), untrusted(r["reason"], "red"), untrusted(r["detail"] or ""),
                  untrusted(r["caption"] or ""))
    return t


def print_rows(console: Console, traces: list[RowTrace], stage: str, max_candidates: int = 20) -> None:
    for trace in traces:
        console.print(render_row(trace, stage, max_candidates))
        console.print()
