"""The `grit` command line: fast start, `plan`, `stats`, `validate`, and errors that name what is wrong."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from grit_pipeline.cli import app

runner = CliRunner()


def test_help_lists_the_engine_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "plan", "stats", "validate"):
        assert command in result.output


def test_cli_start_imports_no_heavy_library():
    code = ("import sys, grit_pipeline.cli; "
            "print(','.join(m for m in ('torch', 'spacy', 'ray', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def test_config_errors_exit_2_naming_the_key(synthetic_input, tmp_path):
    result = runner.invoke(app, ["run", "--input", str(synthetic_input.root), "--output", str(tmp_path / "r"),
                                 "select.min_scor=0.7"])
    assert result.exit_code == 2
    assert "select.min_scor" in result.output
    result = runner.invoke(app, ["plan", "--output", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--input" in result.output
    result = runner.invoke(app, ["plan", "--input", str(synthetic_input.root), "--output", str(tmp_path / "r"),
                                 "--from", "detekt"])
    assert result.exit_code == 2 and "detekt" in result.output


def test_plan_of_a_fresh_run_lists_every_shard_pending(synthetic_input, replay_overrides, tmp_path):
    result = runner.invoke(app, ["plan", "--input", str(synthetic_input.root), "--output", str(tmp_path / "r"),
                                 "--shards", "1-2", "--json", *replay_overrides])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["shards"] == [1, 2]
    stages = {s["stage"]: s for s in plan["stages"]}
    assert list(stages) == ["ingest", "chunks", "detect", "select", "compose"]
    assert all(s["pending"] == [1, 2] and s["cached"] == [] for s in stages.values())
    assert stages["chunks"]["kind"] == "actor pool" and stages["select"]["kind"] == "tasks"
    assert plan["config"]["select"]["min_score"] == 0.65


@pytest.mark.ray
def test_plan_stats_and_validate_on_a_finished_run(pipeline_run, synthetic_input, replay_overrides):
    _, run = pipeline_run
    result = runner.invoke(app, ["plan", "--input", str(synthetic_input.root), "--output", str(run), "--json",
                                 *replay_overrides, "select.min_score=0.9"])
    stages = {s["stage"]: s for s in json.loads(result.output)["stages"]}
    assert [stages[s]["cached"] for s in ("ingest", "chunks", "detect")] == [[0, 1, 2, 3]] * 3
    assert [stages[s]["pending"] for s in ("select", "compose")] == [[0, 1, 2, 3]] * 2

    result = runner.invoke(app, ["stats", str(run), "--json"])
    assert result.exit_code == 0
    summary = json.loads(result.output)
    assert summary == json.loads((run / "report" / "summary.json").read_text())
    assert [f["stage"] for f in summary["funnel"]] == ["ingest", "chunks", "detect", "select", "compose", "publish"]
    assert "GrIT funnel" in runner.invoke(app, ["stats", str(run)]).output

    result = runner.invoke(app, ["validate", str(run)])
    assert result.exit_code == 0, result.output
    assert "4 shard(s)" in result.output and "OK" in result.output


@pytest.mark.ray
def test_validate_fails_naming_file_and_key(pipeline_run, tmp_path):
    _, run = pipeline_run
    bad = tmp_path / "bad"
    shutil.copytree(run / "grit", bad / "grit")
    path = bad / "grit" / "shard-00001.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows[0]["noun_chunks"][0][4] = 1.5  # x2 outside [0, 1]
    rows[1]["grounded_caption"] = rows[1]["grounded_caption"].replace("<phrase>", "", 1)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 1
    assert f"shard-00001.parquet key {rows[0]['key']!r}" in result.output
    assert f"key {rows[1]['key']!r}" in result.output
    assert "2 problem(s)" in result.output
