"""The `grit` command line: fast start, `plan`, `stats`, `validate`, one option style across the commands
(help on every option, fixed value sets as choices), and errors that name what is wrong."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
import typing
from importlib.metadata import version

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from grit_pipeline.cli import app
from grit_pipeline.train.choices import DEVICES
from schemas.location import LOCATION_ENCODERS
from stages.registry import STAGE_ORDER

runner = CliRunner()
WIDE = {"COLUMNS": "250"}  # help tables unwrapped, so a choice list reads as one string


def commands() -> dict:
    return typer.main.get_command(app).commands


def choices_of(param) -> tuple[str, ...]:
    """The values of a Literal-typed option (Optional or not); () for any other type."""
    annotation = param.type_descriptor.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else ()


def test_help_lists_the_engine_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "plan", "stats", "validate"):
        assert command in result.output


def test_cli_start_imports_no_heavy_library():
    # import, then build every command's help (what `grit train --help` does)
    code = ("import sys, grit_pipeline.cli as cli; from typer.testing import CliRunner; "
            "[CliRunner().invoke(cli.app, [c, '--help']) for c in ('run', 'train', 'eval', 'inspect', 'download')]; "
            "print(','.join(m for m in ('torch', 'spacy', 'ray', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def test_version_prints_the_installed_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"grit-pipeline {version('grit-pipeline')}"


def test_every_option_and_argument_has_help():
    missing = [f"{name} {param.name}" for name, command in commands().items() for param in command.params
               if not (param.help or "").strip()]
    assert missing == []


# Options whose values are a fixed set: each must be a choice (checked by the parser, listed by --help).
EXPECTED_CHOICES = {
    ("run", "from_stage"): STAGE_ORDER, ("run", "to_stage"): STAGE_ORDER,
    ("plan", "from_stage"): STAGE_ORDER, ("plan", "to_stage"): STAGE_ORDER,
    ("inspect", "stage"): STAGE_ORDER,
    ("validate", "encoder"): LOCATION_ENCODERS,
    ("export", "fmt"): ("imagefolder", "parquet"),
    ("download", "input_format"): ("parquet", "csv", "csv.gz", "tsv", "tsv.gz", "json", "json.gz", "jsonl",
                                   "jsonl.gz", "txt", "txt.gz"),
    ("download", "resize_mode"): ("keep_ratio", "keep_ratio_largest", "center_crop", "border", "no"),
}


def test_help_of_every_command_lists_its_choices():
    found = {}
    for name, command in commands().items():
        help_text = runner.invoke(app, [name, "--help"], env=WIDE).output
        for param in command.params:
            values = choices_of(param)
            if values:
                found[(name, param.name)] = values
                assert "|".join(values) in help_text, f"grit {name} --help does not list {values}"
    assert {k: found.get(k) for k in EXPECTED_CHOICES} == EXPECTED_CHOICES
    for name in ("train", "eval"):  # devices: a pattern (cuda:N), shown as its forms
        assert "|".join(DEVICES) in runner.invoke(app, [name, "--help"], env=WIDE).output


@pytest.mark.parametrize(("args", "bad", "listed"), [
    (["validate", "somewhere", "--encoder", "floor"], "floor", "unilm"),
    (["inspect", "somewhere", "--stage", "detekt"], "detekt", "compose"),
    (["plan", "--output", "somewhere", "--to", "composer"], "composer", "select"),
    (["export", "--data", "a", "--out", "b", "--format", "zip"], "zip", "imagefolder"),
    (["download", "a", "b", "--resize-mode", "squash"], "squash", "keep_ratio"),
    (["train", "--data", "a", "--out", "b", "--device", "gpu"], "gpu", "cuda:N"),
    (["eval", "--data", "a", "--ckpt", "b", "--device", "cuda:x"], "cuda:x", "cuda:N"),
])
def test_a_bad_choice_exits_2_naming_value_and_choices(args, bad, listed, tmp_path):
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 2
    assert repr(bad) in result.output and listed in result.output
    assert not (tmp_path / "b").exists()


def test_train_device_from_a_config_file_is_checked_too(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("device: gpu\n")
    result = runner.invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "-c", str(cfg)])
    assert result.exit_code == 2 and "device" in result.output and "'gpu'" in result.output


def test_flag_names_are_the_same_across_commands():
    def flags(name: str) -> set[str]:
        return {opt for param in commands()[name].params for opt in param.opts + param.secondary_opts}

    for name in ("run", "plan", "train", "eval", "synth", "export"):
        assert {"--out", "--output", "-o"} <= flags(name), name
    for name in ("plan", "stats", "validate", "train", "eval", "export", "download"):
        assert "--json" in flags(name), name
    for name in ("run", "plan", "train"):
        assert {"--config", "-c"} <= flags(name), name
    for name in ("report", "inspect", "synth", "train"):
        assert "--seed" in flags(name), name


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
