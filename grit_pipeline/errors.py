"""The errors a user can fix, and how `grit` shows them: one `error: <message>` line, exit code 2.

Where it sits: at the base of `grit_pipeline` (it imports only `schemas.display`), so the run directory,
the engine, the commands and the trainer all raise the same kinds. `grit_pipeline.cli` holds the one
handler that turns them into that line (a traceback only with `grit --debug` or `GRIT_DEBUG=1`).

What counts as user-facing, deliberately:

- `UserError` and its subclasses: the project's own errors about what the user gave -- a config value
  (`ConfigError`), a plan that cannot be made (`PlanError`), a path that holds no run (`NotARun`), a file that
  is not what a command reads (`BadInput`, raised through `reading`);
- the standard OS errors about a path (`PATH_ERRORS`: not found, not a directory, is a directory, exists,
  permission denied): every path a command opens is one its user gave (a run directory, an input, a
  config, an output folder) or lies under one.

Everything else -- a `KeyError`, a `TypeError`, an `ArrowInvalid` nobody expected -- is a bug and keeps
its traceback. A file that cannot be parsed is converted where it is read (`reading`), because only there
is its path known: pyarrow's "Parquet magic bytes not found" does not say which file.

Exit codes of `grit` (README, "The CLI"): 0 success; 1 a run that failed (some shards failed, a download
failed) or a validation that found problems; 2 a usage or input error (this module's kinds and the
parser's own errors); 130/143 a run stopped by SIGINT/SIGTERM.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from schemas.display import display_text

USAGE_EXIT = 2  # a usage or input error: the command did nothing
FAILED_EXIT = 1  # the command ran and failed (shards failed, validation found problems)


class UserError(Exception):
    """An error in what the user gave: shown as one `error:` line, exit `exit_code`. The message names the
    path or key and, where it helps, what to do."""

    exit_code = USAGE_EXIT


class BadInput(UserError, ValueError):
    """A file or folder the user gave is not what the command reads (not Parquet, not a checkpoint, ...)."""


# OS errors about a path: user-facing (module docstring). Other OSErrors (a dropped connection, a full
# disk) are not on this list: the commands that expect them say what they mean.
PATH_ERRORS: tuple[type[OSError], ...] = (FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                          FileExistsError, PermissionError)
_BARE_PATH_MEANING = {FileNotFoundError: "no such file or directory", NotADirectoryError: "not a directory",
                      IsADirectoryError: "is a directory", FileExistsError: "already exists",
                      PermissionError: "permission denied"}


def user_message(error: BaseException) -> str:
    """The one line shown for a user-facing error, escaped for display (`schemas.display.display_text`).
    An OS error's message is rebuilt from its path (`path: reason`); newlines become spaces."""
    if isinstance(error, OSError) and error.filename is not None:
        where = str(error.filename) + (f" -> {error.filename2}" if error.filename2 is not None else "")
        text = f"{where}: {error.strerror or type(error).__name__}"
    else:
        text = str(error) or type(error).__name__
        kind = next((k for k in _BARE_PATH_MEANING if type(error) is k), None)
        if kind is not None and len(text.split()) == 1:  # e.g. s3fs: FileNotFoundError("bucket/key")
            text = f"{text}: {_BARE_PATH_MEANING[kind]}"
    return display_text(" ".join(text.split()))


def yaml_problem(error: Exception) -> str:
    """A YAML parse error in one line: `line L, column C: <problem>` (PyYAML's own text spans lines)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is not None and problem:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(error).split())


@contextmanager
def reading(path: str, what: str, *errors: type[BaseException]) -> Iterator[None]:
    """Wrap the read of one user-given file: a failure to parse it (pyarrow's `ArrowException`s -- not
    Parquet, truncated, unsupported -- plus `errors`) becomes `BadInput("<path>: not a readable <what>:
    <reason>")`. Keep the block to the read itself, so a bug in what follows is not dressed as bad input."""
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowException, *errors) as e:
        if isinstance(e, UserError):
            raise
        reason = yaml_problem(e) if type(e).__module__.startswith("yaml") else " ".join(str(e).split())
        raise BadInput(f"{local_path(path)}: not a readable {what}: {reason}") from e


def local_path(path: str) -> str:
    """`file:///x/y` (what fsspec's `unstrip_protocol` gives for local files) as the path `/x/y`."""
    return path[len("file://"):] if path.startswith("file://") else path
