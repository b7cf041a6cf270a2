"""Stage names in pipeline order and the class behind each; imported lazily so that using one stage
(e.g. `select` in a notebook) does not import spaCy or torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # stages.base imports pyarrow; the CLI reads STAGE_ORDER at start-up
    from stages.base import Stage

STAGE_ORDER: tuple[str, ...] = ("ingest", "chunks", "detect", "select", "compose")
StageName = Literal[STAGE_ORDER]  # a choice of the stage names, in pipeline order (CLI options)

_CLASSES = {
    "ingest": "stages.ingest:IngestStage",
    "chunks": "stages.chunks:ChunksStage",
    "detect": "stages.detect:DetectStage",
    "select": "stages.select:SelectStage",
    "compose": "stages.compose:ComposeStage",
}


def stage_class(name: str) -> type[Stage]:
    try:
        module_name, attr = _CLASSES[name].split(":")
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; stages are {', '.join(STAGE_ORDER)}") from None
    return getattr(importlib.import_module(module_name), attr)
