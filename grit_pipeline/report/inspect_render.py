"""Terminal rendering of `grit inspect` with rich: one table per row, nested tables for list columns.

Every caption, key and detail goes in as a `rich.text.Text`, never as markup, so `[bold]` or `[/]` in web
captions prints literally.
"""

from __future__ import annotations

import pyarrow as pa
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from grit_pipeline.report.boxes import candidate_boxes, chunk_color, chunk_texts
from grit_pipeline.report.row_trace import RowTrace


def _box(x1: float, y1: float, x2: float, y2: float) -> str:
    return f"{x1:.3f} {y1:.3f} {x2:.3f} {y2:.3f}"


def highlighted_caption(caption: str, chunks: list[dict] | None) -> Text:
    text = Text(caption)
    for i, c in enumerate(chunks or []):
        if 0 <= c["start"] < c["end"] <= len(caption):
            text.stylize(f"bold {chunk_color(i)}", c["start"], c["end"])
    return text


def _chunks_table(caption: str, chunks: list[dict]) -> Table:
    t = Table(show_edge=False, pad_edge=False, box=None, header_style="bold dim")
    for col in ("#", "chunk", "span", "expression", "conj"):
        t.add_column(col)
    for i, c in enumerate(chunks):
        t.add_row(Text(str(i), style=chunk_color(i)), Text(caption[c["start"]:c["end"]]), f"{c['start']}-{c['end']}",
                  Text(caption[c["expr_start"]:c["expr_end"]]), "yes" if c["has_conj"] else "")
    return t


def _candidates_table(candidates: list[dict], texts: list[str], limit: int) -> Group:
    t = Table(show_edge=False, pad_edge=False, box=None, header_style="bold dim")
    for col in ("box", "chunk", "score", "box_score", "x1 y1 x2 y2"):
        t.add_column(col, justify="right" if col in ("box", "score", "box_score") else "left")
    ordered = sorted(candidates, key=lambda c: (-c["score"], c["box"], c["chunk"]))
    for c in ordered[:limit]:
        name = texts[c["chunk"]] if 0 <= c["chunk"] < len(texts) else "(no chunk)"
        t.add_row(str(c["box"]), Text(name, style=chunk_color(c["chunk"])), f"{c['score']:.3f}",
                  f"{c['box_score']:.3f}", _box(c["x1"], c["y1"], c["x2"], c["y2"]))
    boxes = len(candidate_boxes(candidates, texts))
    note = Text(f"{len(candidates)} chunk-box scores over {boxes} boxes (before threshold and NMS)"
                + (f"; best {limit} shown" if len(candidates) > limit else ""), style="dim")
    return Group(t, note)


def _pairs_table(pairs: list[dict], texts: list[str]) -> Table:
    t = Table(show_edge=False, pad_edge=False, box=None, header_style="bold dim")
    for col in ("chunk", "score", "x1 y1 x2 y2"):
        t.add_column(col, justify="right" if col == "score" else "left")
    for p in pairs:
        name = texts[p["chunk"]] if 0 <= p["chunk"] < len(texts) else f"chunk {p['chunk']}"
        t.add_row(Text(name, style=chunk_color(p["chunk"])), f"{p['score']:.3f}", _box(p["x1"], p["y1"], p["x2"], p["y2"]))
    return t


def _grit_table(caption: str, noun_chunks: list, ref_exps: list, chunks: list[dict] | None) -> Table:
    index = {(c["start"], c["end"]): i for i, c in enumerate(chunks or [])}
    t = Table(show_edge=False, pad_edge=False, box=None, header_style="bold dim")
    for col in ("noun chunk", "referring expression", "score", "x1 y1 x2 y2"):
        t.add_column(col, justify="right" if col == "score" else "left", no_wrap=col == "x1 y1 x2 y2")
    for nc, ex in zip(noun_chunks, ref_exps, strict=True):
        color = chunk_color(index.get((int(nc[0]), int(nc[1])), -1))
        t.add_row(Text(caption[int(nc[0]):int(nc[1])], style=color), Text(caption[int(ex[0]):int(ex[1])]),
                  f"{nc[6]:.3f}", _box(*nc[2:6]))
    return t


def render_row(trace: RowTrace, stage: str, max_candidates: int = 20) -> Table:
    row = trace.row
    caption = row.get("caption") or ""
    chunks = row.get("chunks")
    texts = chunk_texts(caption, chunks)
    t = Table(title=Text(f"{trace.key}  ·  shard {trace.shard}  ·  {stage}", style="bold"), show_header=False,
              title_justify="left", expand=False)
    t.add_column("field", style="dim", no_wrap=True)
    t.add_column("value", overflow="fold")
    t.add_row("caption", highlighted_caption(caption, chunks))
    if row.get("image_ref") or row.get("width"):
        size = f"{row.get('width')}x{row.get('height')}" if row.get("width") else "size unknown"
        t.add_row("image", Text(f"{row.get('image_ref') or '(none)'}  ({size})"))
    if row.get("url"):
        t.add_row("url", Text(row["url"]))
    if chunks is not None and stage != "ingest":
        t.add_row("chunks", _chunks_table(caption, chunks))
    if stage in trace.reached:
        if stage == "detect":
            t.add_row("candidates", _candidates_table(row.get("candidates") or [], texts, max_candidates))
        elif stage == "select":
            t.add_row("pairs", _pairs_table(row.get("pairs") or [], texts))
        elif stage == "compose":
            t.add_row("boxes", _grit_table(caption, row.get("noun_chunks") or [], row.get("ref_exps") or [], chunks))
            t.add_row("grounded", Text(row.get("grounded_caption") or ""))
            t.add_row("markdown", Text(row.get("markdown_caption") or ""))
    if trace.dropped:
        d = trace.dropped
        t.add_row("dropped", Text(f"at {d['stage']}: {d['reason']}" + (f" — {d['detail']}" if d["detail"] else ""),
                                  style="bold red"))
    return t


def render_rejects(table: pa.Table, stage: str) -> Table:
    t = Table(title=Text(f"rejects of {stage}", style="bold"), title_justify="left")
    for col in ("key", "shard", "reason", "detail", "caption"):
        t.add_column(col, justify="right" if col == "shard" else "left", overflow="fold")
    for r in table.to_pylist():
        t.add_row(Text(r["key"]), str(r["shard"]), Text(r["reason"], style="red"), Text(r["detail"] or ""),
                  Text(r["caption"] or ""))
    return t


def print_rows(console: Console, traces: list[RowTrace], stage: str, max_candidates: int = 20) -> None:
    for trace in traces:
        console.print(render_row(trace, stage, max_candidates))
        console.print()
