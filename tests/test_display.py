"""Safe display of untrusted text (`schemas.display`) and where it is used: the log formatter of the CLI,
`grit validate` messages, the stats table, the HTML report's template."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

from grit_pipeline.commands.stats import funnel_table
from grit_pipeline.commands.validate import Problem
from grit_pipeline.engine.stats import ShardStats, merge, shard_stats
from grit_pipeline.logs import SafeFormatter
from grit_pipeline.report.page import _ENV
from schemas.display import UNSAFE_CODEPOINTS, display_text
from schemas.tables import REJECT_SCHEMA

HOSTILE = "a dog\x1b[31m red\x07\x00 \x9b2J \u202eevil\u202c \u2066iso\u2069 \u200f\r\nfake line"


def raw_unsafe(text: str) -> list[str]:
    return [hex(ord(ch)) for ch in text if ord(ch) in set(UNSAFE_CODEPOINTS)]


@pytest.mark.parametrize("char, shown", [
    ("\x00", "\\x00"), ("\x1b", "\\x1b"), ("\x07", "\\x07"), ("\t", "\\x09"), ("\n", "\\x0a"), ("\x7f", "\\x7f"),
    ("\x85", "\\x85"), ("\x9b", "\\x9b"), ("\u202e", "\\u202e"), ("\u202a", "\\u202a"), ("\u2066", "\\u2066"),
    ("\u2069", "\\u2069"), ("\u200e", "\\u200e"), ("\u200f", "\\u200f"), ("\u061c", "\\u061c"),
    ("\u2028", "\\u2028"),
])
def test_each_unsafe_character_is_shown_escaped(char, shown):
    assert display_text(f"a{char}b") == f"a{shown}b"
    assert raw_unsafe(f"a{char}b") and raw_unsafe(display_text(f"a{char}b")) == []


@pytest.mark.parametrize("text", [
    "a brown dog \U0001f436 on the grass", "caf\u00e9 cafe\u0301", "\u05db\u05dc\u05d1 \u0639\u0644\u0649",
    "family \U0001f468\u200d\U0001f469\u200d\U0001f467", "tags <phrase>[x](y)</phrase> \\x1b as text", "",
])
def test_legitimate_text_is_unchanged(text):
    assert display_text(text) == text and raw_unsafe(text) == []


def test_keep_and_non_strings():
    assert display_text("a\nb\x1b", keep="\n") == "a\nb\\x1b"
    assert display_text(42) == "42" and display_text(None) == "None"


def test_log_lines_carry_no_raw_control_character():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(SafeFormatter("%(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger("grit-test-display")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("row %s: caption %s", "k\x1b]0;title\x07", HOSTILE)
        try:
            raise ValueError(f"bad caption {HOSTILE}")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    lines = text.splitlines()
    assert lines[0].startswith("WARNING grit-test-display: row k\\x1b]0;title\\x07: caption a dog\\x1b[31m")
    assert "\\x0d\\x0afake line" in lines[0]  # the message's newline cannot forge a log line
    assert "Traceback (most recent call last):" in text  # tracebacks keep their line breaks
    assert raw_unsafe(text.replace("\n", "")) == []


def test_validate_problems_print_safely():
    p = Problem("shard-00000.parquet", "k\x1b[2J", f"tagged span {HOSTILE!r}")
    assert raw_unsafe(str(p)) == [] and "shard-00000.parquet" in str(p)
    assert raw_unsafe(str(Problem("f", None, HOSTILE))) == []


def test_stats_carry_and_sum_counters_and_show_them_safely():
    import pyarrow as pa

    out = pa.table({"key": ["a", "b"]})
    st = shard_stats("ingest", 0, "fp", 3, out, _rejects(["c"], ["empty_caption"]),
                     counters={"control_chars_removed": 2})
    doc = st.to_json()
    assert doc["counters"] == {"control_chars_removed": 2}
    old = {k: v for k, v in doc.items() if k != "counters"} | {"shard": 1}  # stats.json of before counters
    assert ShardStats.model_validate(old).counters == {}
    summary = merge(["ingest"], {"ingest": [doc, {**doc, "shard": 2}, old]})
    assert summary["stages"]["ingest"]["counters"] == {"control_chars_removed": 4}
    console = Console(file=io.StringIO(), width=200, force_terminal=True, color_system=None)
    console.print(funnel_table(summary))
    assert "ingest: control_chars_removed 4" in console.file.getvalue()
    hostile = {**doc, "rejects": {"bad\x1b[31mreason": 1}, "counters": {"n\u202eame": 1}}
    summary = merge(["ingest"], {"ingest": [hostile]})
    console = Console(file=io.StringIO(), width=200, force_terminal=True, color_system=None)
    console.print(funnel_table(summary))
    text = console.file.getvalue()
    assert "n\\u202eame 1" in text and "bad\\x1b[31mreason 1" in text
    assert raw_unsafe(text.replace("\n", "")) == []


def _rejects(keys, reasons):
    import pyarrow as pa

    return pa.table({"key": keys, "stage": ["ingest"] * len(keys), "reason": reasons, "detail": [""] * len(keys)},
                    schema=REJECT_SCHEMA)


def test_report_template_escapes_every_value_and_keeps_our_markup():
    html = _ENV.from_string("<p data-k=\"{{ key }}\">{{ caption }}</p>{{ svg|safe }}<pre>{{ yaml|multiline }}</pre>"
                            ).render(key="k\x1b", caption=f"<script>{HOSTILE}", svg="<svg>\n<g/></svg>",
                                     yaml="a: 1\nb: \u202e")
    assert "&lt;script&gt;" in html and "\\x1b" in html and "\\u202e" in html
    assert "<svg>\n<g/></svg>" in html and "a: 1\nb: \\u202e" in html
    assert raw_unsafe(html.replace("\n", "")) == []
