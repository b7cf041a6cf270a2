"""Every `grit` sub-command fails on a bad path in one clear line: `error: <message naming the path>`, the
documented exit code, no traceback (`grit_pipeline.errors`, `GritGroup` in `grit_pipeline.cli`).

The commands are enumerated from the real app (what `grit --help` lists) and each invocation is built from
the command's own parameters, so a command added later is covered without anyone listing it: its path
parameters are recognized by name (the names the commands share: `run`, `input`, `data`, `config`, `out`,
...), and a string parameter with a name not classified below fails `test_every_string_parameter_is_classified`
until someone says whether it is a path.
"""

from __future__ import annotations

import subprocess
import sys
import types
import typing

import pytest
import typer
from typer.testing import CliRunner

from grit_pipeline.cli import GritGroup, app

runner = CliRunner()

# Parameters that name something the command reads, and something it writes.
INPUT_PATHS = {"run", "run_dir", "path", "input", "data", "ckpt", "config", "paths", "release"}
OUTPUT_PATHS = {"output", "out", "png"}
# Inputs the parser cannot require (a config file or a deprecated alias may stand in) but a command needs.
NEEDED_INPUTS = {"input", "data"}
# String parameters that are not paths.
NOT_PATHS = {"overrides", "shards", "address", "key", "reason", "device", "url_col", "caption_col", "keep",
             "external_images", "join", "nms_iou"}  # external_images: URI prefixes that allow reads, never opened themselves

# The bad paths, each tried on every path parameter of every command.
CASES = ("missing", "file", "empty-folder", "garbage-parquet", "garbage-yaml", "garbage-run",
         "garbage-checkpoint")
FILE_CASES = {"file", "garbage-parquet", "garbage-yaml"}  # an output given one of these cannot be written
# Exit 1 where documented (README "The CLI"): `grit validate` found problems -- a file that is not a
# readable shard, or no shard at all -- rather than being unable to start.
VALIDATION_FAILS = {("validate", c) for c in ("file", "empty-folder", "garbage-parquet", "garbage-yaml",
                                              "garbage-checkpoint")}
GARBAGE = bytes(range(256)) * 4  # not Parquet, not UTF-8, not YAML


def make_case(case: str, root) -> str:
    path = root / case
    if case == "file":
        path.write_text("a text file where a folder is expected\n")
    elif case == "empty-folder":
        path.mkdir()
    elif case == "garbage-parquet":
        path = root / "garbage.parquet"
        path.write_bytes(GARBAGE)
    elif case == "garbage-yaml":
        path = root / "garbage.yaml"
        path.write_text("stages: [select\n  min_score: 0.7\n")
    elif case == "garbage-run":  # looks like a run directory and a folder of shards; holds garbage
        (path / "grit").mkdir(parents=True)
        (path / "run.yaml").write_text("not a mapping\n")
        (path / "grit" / "shard-00000.parquet").write_bytes(GARBAGE)
    elif case == "garbage-checkpoint":  # looks like a training output folder; holds garbage
        step = path / "checkpoints" / "step-0000001"
        step.mkdir(parents=True)
        (path / "latest").write_text("checkpoints/step-0000001")
        for name in ("config.json", "tokenizer.json", "trainer_state.json", "model.safetensors"):
            (step / name).write_bytes(GARBAGE)
    return str(path)


def commands() -> dict:
    return typer.main.get_command(app).commands


def base_type(param) -> typing.Any:
    """A parameter's value type without Optional and list."""
    annotation = param.type_descriptor.annotation
    while typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def flag(param) -> str:
    return param.opts[0]


def required_value(param) -> str:
    """A valid value for a required parameter that is not a path."""
    annotation = base_type(param)
    if typing.get_origin(annotation) is typing.Literal:
        return str(typing.get_args(annotation)[0])
    if annotation in (int, float):
        return "1"
    raise AssertionError(f"no value for required parameter {param.name!r}: add it to test_cli_errors.py")


def path_params(command) -> list:
    return [p for p in command.params if not p.hidden and p.name in INPUT_PATHS | OUTPUT_PATHS]


def invocation(name: str, command, target, value: str) -> tuple[list[str], bool]:
    """`grit NAME ...` with `value` for the path parameter `target` and for every input the command needs;
    other required parameters get a valid value. Also returns whether an input got `value`."""
    args: list[str] = [name]
    reads = False
    for param in command.params:
        if param.hidden:
            continue
        is_path = param.name in INPUT_PATHS | OUTPUT_PATHS
        needed = param.required or param.name in NEEDED_INPUTS
        given = param is target or (param.name in INPUT_PATHS | OUTPUT_PATHS and needed)
        if is_path and given:
            reads = reads or param.name in INPUT_PATHS
            values = [value, value] if param.nargs == -1 else [value]  # e.g. download URL_LIST OUTPUT
            for v in values:
                args += [v] if param.param_type_name == "argument" else [flag(param), v]
        elif param.required and not is_path:
            v = required_value(param)
            args += [v] if param.param_type_name == "argument" else [flag(param), v]
    return args, reads


def matrix() -> list:
    """(command, path parameter, case); where the invocation only writes to the path, only the cases that
    cannot be written to (a file where a folder is expected): a missing or existing folder is a fine
    output."""
    out = []
    for name, command in commands().items():
        for target in path_params(command):
            _, reads = invocation(name, command, target, "PATH")
            for case in CASES if reads else [c for c in CASES if c in FILE_CASES]:
                out.append(pytest.param(name, target.name, case, id=f"{name}-{target.name}-{case}"))
    return out


def test_every_command_has_a_path_to_test():
    missing = [name for name, command in commands().items() if not path_params(command)]
    assert missing == [], f"commands without a recognized path parameter: {missing}"


def test_every_string_parameter_is_classified():
    unknown = [f"{name} {p.name}" for name, command in commands().items() for p in command.params
               if base_type(p) is str and not p.hidden and p.name not in INPUT_PATHS | OUTPUT_PATHS | NOT_PATHS]
    assert unknown == [], "say in test_cli_errors.py whether these are paths (INPUT_PATHS, OUTPUT_PATHS) or not"


@pytest.mark.parametrize(("name", "target", "case"), matrix())
def test_a_bad_path_fails_in_one_line(name, target, case, tmp_path):
    command = commands()[name]
    param = next(p for p in command.params if p.name == target)
    bad = make_case(case, tmp_path)
    args, _ = invocation(name, command, param, bad)
    result = runner.invoke(app, args)
    shown = f"grit {' '.join(args)} ->\n{result.output}"
    assert "Traceback" not in result.output, shown
    assert result.exception is None or isinstance(result.exception, SystemExit), (shown, result.exception)
    expected = 1 if (name, case) in VALIDATION_FAILS else 2
    assert result.exit_code == expected, shown
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    if expected == 2:
        assert len(errors) == 1 and bad in errors[0], shown
    else:  # the validation report names the file; at most one closing error line
        assert len(errors) <= 1 and bad in result.output, shown


def test_the_errors_of_the_issue(tmp_path):
    """The four commands that printed a traceback, typed as a user did."""
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(GARBAGE)
    for args, path in ((["validate", "/no/such/run"], "/no/such/run"),
                       (["train", "--data", "/no/such/folder", "--out", str(tmp_path / "m"), "--steps", "1"],
                        "/no/such/folder"),
                       (["export", "--data", "/no/such/folder", "--out", str(tmp_path / "x")],
                        "/no/such/folder"),
                       (["eval", "--data", str(garbage), "--ckpt", "/no/such/ckpt"], "/no/such/ckpt"),
                       (["export", "--data", str(garbage), "--out", str(tmp_path / "x")], str(garbage))):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert result.output.startswith(f"error: {path}"), result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        if args[:3] == ["export", "--data", "/no/such/folder"]:
            assert not (tmp_path / "x").exists()  # export checks its input before it writes


def test_messages_are_escaped(tmp_path):
    odd = tmp_path / "run\x1b[31m\u202e"
    result = runner.invoke(app, ["stats", str(odd)])
    assert result.exit_code == 2
    assert "\x1b" not in result.output and "\u202e" not in result.output
    assert "\\x1b[31m\\u202e" in result.output


def test_debug_shows_the_traceback(tmp_path):
    cmd = [sys.executable, "-m", "grit_pipeline.cli", "--debug", "validate", str(tmp_path / "nothing")]
    plain = subprocess.run([c for c in cmd if c != "--debug"], capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    debug = subprocess.run(cmd, capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr
    result = runner.invoke(app, ["validate", str(tmp_path / "nothing")], env={"GRIT_DEBUG": "1"})
    assert isinstance(result.exception, FileNotFoundError)


def test_a_bug_keeps_its_traceback():
    """Only the user-facing kinds are turned into one line: anything else is a bug and propagates."""
    bug = typer.Typer(cls=GritGroup)

    @bug.callback()
    def main() -> None:
        pass

    @bug.command()
    def broken() -> None:
        {}["missing"]  # noqa: B018

    @bug.command()
    def missing_file() -> None:
        raise FileNotFoundError(2, "No such file or directory", "/the/path")

    result = runner.invoke(bug, ["broken"])
    assert isinstance(result.exception, KeyError) and "error:" not in result.output
    result = runner.invoke(bug, ["missing-file"])
    assert result.exit_code == 2 and result.output == "error: /the/path: No such file or directory\n"


def test_deprecated_shards_flag_still_works_with_a_warning(tmp_path):
    result = runner.invoke(app, ["export", "--shards", str(tmp_path / "none"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    lines = result.output.splitlines()
    assert lines[0].startswith("warning: `grit export --shards") and "--data" in lines[0]
    assert lines[1].startswith(f"error: {tmp_path / 'none'}")
    both = runner.invoke(app, ["export", "--shards", "a", "--data", "b", "--out", str(tmp_path / "x")])
    assert both.exit_code == 2 and "--data" in both.output
