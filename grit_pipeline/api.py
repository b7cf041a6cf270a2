"""Python API mirroring the `grit` CLI: `run_pipeline` (grit run), `plan` (grit plan), `stats`
(grit stats), `validate` (grit validate).

`config` is a YAML path, a mapping (same shape as the YAML), or a `PipelineConfig`; `overrides` are
dotted `stage.key=value` strings applied on top, exactly as on the command line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from grit_pipeline.commands.validate import ValidationReport, validate_run
from grit_pipeline.config import load_config
from grit_pipeline.engine.plan import RunPlan, build_plan
from grit_pipeline.engine.runner import RunResult, execute
from grit_pipeline.engine.summary import summary_from_run


def resolve_config(config: str | Path | Mapping[str, Any] | BaseModel | None = None,
                   overrides: Sequence[str] = ()) -> BaseModel:
    if isinstance(config, BaseModel):
        if not overrides:
            return config
        return load_config(None, overrides, base=config.model_dump(mode="json"))
    if isinstance(config, Mapping):
        return load_config(None, overrides, base=config)
    return load_config(config, overrides)


def plan(config: str | Path | Mapping[str, Any] | BaseModel | None = None, *, input: str | None = None,  # noqa: A002
         output: str, overrides: Sequence[str] = (), shards: str | None = None, limit: int | None = None,
         from_stage: str | None = None, to_stage: str | None = None) -> RunPlan:
    """What `run_pipeline` would do: fingerprints, cached and pending shards per stage. Starts no Ray."""
    return build_plan(resolve_config(config, overrides), input_uri=input, output_uri=output, shards=shards,
                      limit=limit, from_stage=from_stage, to_stage=to_stage)


def run_pipeline(config: str | Path | Mapping[str, Any] | BaseModel | None = None, *, input: str | None = None,  # noqa: A002
                 output: str, overrides: Sequence[str] = (), shards: str | None = None,
                 limit: int | None = None, from_stage: str | None = None, to_stage: str | None = None,
                 address: str | None = None, progress: bool | None = None) -> RunResult:
    """Run the pipeline (local Ray unless `address`); returns per-stage outcomes and failed shards."""
    extra = list(overrides) + ([f"run.address={address}"] if address else [])
    p = plan(config, input=input, output=output, overrides=extra, shards=shards, limit=limit,
             from_stage=from_stage, to_stage=to_stage)
    return execute(p, progress=progress)


def stats(run: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Merged per-stage stats and funnel of a run (also written to `report/summary.json`)."""
    return summary_from_run(run, storage_options)


def validate(path: str, storage_options: Mapping[str, Any] | None = None,
             encoder: str | None = None) -> ValidationReport:
    """Check a run's final shards against the GRIT schema and invariants."""
    return validate_run(path, storage_options, encoder)
