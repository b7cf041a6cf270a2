"""Log setup of the command-line entry points: log lines never carry raw control characters.

Log messages quote untrusted text (keys, captions, file names from a source, exception messages that
include them). `SafeFormatter` writes every record through `schemas.display.display_text`, so an ESC or a
bidirectional override in a caption shows as `\\x1b` / `\\u202e` instead of acting on the terminal or the
log viewer, and a newline in a message cannot forge a second log line. Tracebacks keep their line breaks.
The `grit` commands call `basic_config` where they used to call `logging.basicConfig`.
"""

from __future__ import annotations

import logging

from schemas.display import display_text


class SafeFormatter(logging.Formatter):
    """A `logging.Formatter` that escapes control and bidirectional-override characters."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return display_text(super().formatMessage(record))

    def formatException(self, ei) -> str:  # noqa: N802
        return display_text(super().formatException(ei), keep="\n")

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return display_text(super().formatStack(stack_info), keep="\n")


def basic_config(level: int = logging.INFO, format: str = logging.BASIC_FORMAT) -> None:  # noqa: A002
    """`logging.basicConfig(level=..., format=...)` with a `SafeFormatter` on its stderr handler. Like
    basicConfig, it does nothing when the root logger already has handlers."""
    handler = logging.StreamHandler()
    handler.setFormatter(SafeFormatter(format))
    logging.basicConfig(level=level, handlers=[handler])
