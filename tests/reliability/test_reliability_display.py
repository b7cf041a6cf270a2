"""Untrusted text from the bad-input corpus never drives the user's terminal.

Captions with C0/C1 control characters (NUL, ESC sequences, BEL, an 8-bit CSI) lose them in ingest, before
any offset is computed, and nothing downstream holds them; captions with bidirectional overrides keep them
in the data (they are text), and every command that shows a row -- `grit inspect` at each stage, its
rejects view, `grit stats` -- prints them escaped (`\\u202e`), never raw. The corpus runs through the
stages in-process and is committed in the run-directory layout, then the real `grit` CLI reads it.
"""

from __future__ import annotations

import pytest
from stagewise import write_run_dir
from typer.testing import CliRunner

from schemas.display import UNSAFE_CODEPOINTS
from stages.registry import STAGE_ORDER

HOSTILE_CASES = ("caption:control_chars", "caption:c1_controls", "caption:bidi_override")
C0_C1 = {*range(0x00, 0x20), *range(0x7F, 0xA0)} - {0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x85}


def raw_unsafe(text: str) -> list[str]:
    """Unsafe characters in printed output (line breaks between lines of output are fine)."""
    return sorted({hex(ord(ch)) for ch in text if ord(ch) in set(UNSAFE_CODEPOINTS) and ch != "\n"})


@pytest.fixture(scope="module")
def run_dir(stagewise_full, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("display") / "run"
    write_run_dir(stagewise_full, root, {"ingest": {"format": "img2dataset"}, "select": {}, "compose": {}})
    return root


@pytest.fixture(scope="module")
def app():
    from grit_pipeline.cli import app

    return app


def grit(app, *args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_control_characters_never_reach_chunks_or_final_shards(stagewise_full, corpus):
    cases = corpus.rows_by_case()
    for sr in stagewise_full.shards.values():
        ingest = {r["key"]: r["caption"] for r in sr.outputs["ingest"].to_pylist()}
        for key, caption in ingest.items():
            assert not [ch for ch in caption if ord(ch) in C0_C1], (key, caption)
        for row in sr.outputs["chunks"].to_pylist():
            for c in row["chunks"]:
                text = ingest[row["key"]][c["start"]:c["end"]]
                assert not [ch for ch in text if ord(ch) in C0_C1], (row["key"], text)
    captions = {r["key"]: r["caption"] for r in stagewise_full.shards[1].outputs["compose"].to_pylist()}
    for case in HOSTILE_CASES:
        assert captions[cases[case].key] == cases[case].final_caption
    assert cases["caption:control_chars"].final_caption != cases["caption:control_chars"].caption
    # the rows whose caption lost a control character, counted in ingest's stats
    assert stagewise_full.shards[1].counters["ingest"] == {"control_chars_removed": 2}


@pytest.mark.parametrize("case", HOSTILE_CASES)
@pytest.mark.parametrize("stage", STAGE_ORDER)
def test_grit_inspect_prints_no_raw_control_character(app, run_dir, corpus, case, stage):
    key = corpus.rows_by_case()[case].key
    out = grit(app, "inspect", str(run_dir), "--stage", stage, "--key", key, "--max-candidates", "50")
    assert key in out
    assert raw_unsafe(out) == []
    if case == "caption:bidi_override":
        assert "\\u202egreen grass\\u202c \\u2066next\\u2069" in out
    if stage == "detect":
        assert "kept" in out  # the candidates show select's rule in force


def test_grit_inspect_rejects_print_hostile_keys_and_captions_escaped(app, run_dir, corpus):
    out = grit(app, "inspect", str(run_dir), "--stage", "ingest", "--rejects", "-n", "100")
    assert "bad\\x07key" in out  # the key ingest refused, as the reject records it
    assert corpus.rows_by_case()["caption:only_control_chars"].key in out
    assert "caption holds only whitespace and control characters" in out
    assert raw_unsafe(out) == []
    for stage in STAGE_ORDER[1:]:
        assert raw_unsafe(grit(app, "inspect", str(run_dir), "--stage", stage, "--rejects", "-n", "100")) == []


def test_grit_stats_shows_the_control_character_counter(app, run_dir):
    out = grit(app, "stats", str(run_dir))
    assert "ingest: control_chars_removed 2" in out
    assert raw_unsafe(out) == []
