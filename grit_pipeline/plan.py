"""Planning a run: which source shards, which fingerprints, and per stage which shards are already
committed (cached) and which will run (pending). Reads the input listing and the run directory's
`_done` markers; starts no Ray and imports no model library, so `grit plan` answers in a second or two.

    plan = build_plan(config, input_uri="data/in", output_uri="runs/a")
    plan.fingerprints            # {"ingest": "3f2a...", ..., "compose": "..."}
    plan.stage("detect").pending # shards detect will run

A shard enters the streaming pipeline (`grit_pipeline.scheduler`) at its first selected stage that is
not committed; earlier stages' committed outputs are its input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from grit_pipeline.config import RunConfig, parse_shard_spec, pipeline_config_model
from grit_pipeline.fingerprint import chain_fingerprints, source_fingerprint
from grit_pipeline.rundir import RunDir
from stages.base import Execution, Resources, Stage, StageConfig


class PlanError(ValueError):
    """A run that cannot start: no input, unknown stage, nothing to read. The message says what to do."""


@dataclass
class StagePlan:
    name: str
    index: int
    cls: type[Stage]
    config: StageConfig
    execution: Execution
    fingerprint: str
    resources: Resources
    has_prepare: bool  # a CPU step (image decoding) runs in tasks ahead of the stage's actors
    selected: bool  # inside --from/--to
    cached: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)

    @property
    def kind(self) -> str:
        if self.resources.actor:
            return "actor pool" + (" (GPU)" if self.resources.gpus else "")
        return "tasks"


@dataclass
class RunPlan:
    config: BaseModel  # a PipelineConfig: one section per stage plus `run`
    input_uri: str
    rundir: RunDir
    sources: dict[int, Any]  # shard index -> SourceShard
    shards: list[int]  # selected source shards, ascending
    caps: dict[int, int]  # shard -> max rows, from run.limit
    stages: list[StagePlan]

    @property
    def run(self) -> RunConfig:
        return self.config.run  # type: ignore[attr-defined]

    @property
    def fingerprints(self) -> dict[str, str]:
        return {s.name: s.fingerprint for s in self.stages}

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input_uri,
            "output": self.rundir.uri,
            "shards": self.shards,
            "stages": [{
                "stage": s.name, "version": s.cls.version, "fingerprint": s.fingerprint, "kind": s.kind,
                "cpus": s.resources.cpus, "gpus": s.resources.gpus, "pool_size": s.resources.pool_size,
                "batch_size": s.resources.batch_size, "selected": s.selected,
                "cached": s.cached, "pending": s.pending,
            } for s in self.stages],
        }


def default_stage_classes() -> dict[str, type[Stage]]:
    from stages.registry import STAGE_ORDER, stage_class

    return {name: stage_class(name) for name in STAGE_ORDER}


def build_plan(config: BaseModel, *, input_uri: str | None = None, output_uri: str, shards: str | None = None,
               limit: int | None = None, from_stage: str | None = None, to_stage: str | None = None,
               stage_classes: Mapping[str, type[Stage]] | None = None, inspect_cache: bool = True) -> RunPlan:
    """Resolve what a run will do: sources, selected shards, fingerprints, and per stage which shards are
    already committed (cached) and which will run (pending).

    `stage_classes` replaces the registered stages (same names and order), e.g. with fault-injecting
    subclasses in tests; `config` must then be a `pipeline_config_model(stage_classes)` instance."""
    classes = dict(stage_classes) if stage_classes is not None else default_stage_classes()
    names = list(classes)
    run: RunConfig = config.run  # type: ignore[attr-defined]
    updates: dict[str, Any] = {}
    if input_uri is not None:
        updates["input"] = input_uri
    if shards is not None:
        parse_shard_spec(shards)
        updates["shards"] = str(shards)
    if limit is not None:
        updates["limit"] = limit
    if updates:
        run = run.model_copy(update=updates)
        config = config.model_copy(update={"run": run})
    if not run.input:
        raise PlanError("no input: pass --input URI (or set run.input in the config)")
    for flag, name in (("--from", from_stage), ("--to", to_stage)):
        if name is not None and name not in classes:
            raise PlanError(f"{flag} {name!r}: unknown stage; stages are {', '.join(names)}")
    lo = names.index(from_stage) if from_stage else 0
    hi = names.index(to_stage) if to_stage else len(names) - 1
    if lo > hi:
        raise PlanError(f"--from {from_stage} comes after --to {to_stage}")

    stage_cfgs = {n: getattr(config, n) for n in names}
    executions = {n: getattr(run.resources, n) for n in names}
    source_stage = classes[names[0]](stage_cfgs[names[0]], executions[names[0]])
    try:
        discovered = list(source_stage.discover(run.input))  # type: ignore[attr-defined]
    except FileNotFoundError as e:
        raise PlanError(f"input {run.input}: {e}") from None
    if not discovered:
        raise PlanError(f"input {run.input}: no source shards found (expected img2dataset output, webdataset "
                        "tars, a folder with captions, or a Parquet file)")
    sources = {int(s.index): s for s in discovered}
    selected = run.selected_shards(list(sources))
    if not selected:
        raise PlanError(f"--shards {run.shards}: none of the {len(sources)} source shards "
                        f"({min(sources)}-{max(sources)}) selected")
    caps: dict[int, int] = {}
    if run.limit is not None:
        selected, caps = _apply_limit(source_stage, sources, selected, run.limit)

    fps = chain_fingerprints([(n, classes[n].version, stage_cfgs[n]) for n in names],
                             source_fingerprint(run.input, run.limit))
    rundir = RunDir(output_uri, run.storage_options)
    plans = []
    for i, n in enumerate(names):
        stage = classes[n](stage_cfgs[n], executions[n])
        sp = StagePlan(name=n, index=i, cls=classes[n], config=stage_cfgs[n], execution=executions[n],
                       fingerprint=fps[n], resources=stage.resources,
                       has_prepare=type(stage).has_prepare(), selected=lo <= i <= hi)
        if inspect_cache:
            done = rundir.committed(n, fps[n])
            sp.cached = [s for s in selected if s in done]
            sp.pending = [s for s in selected if s not in done]
        plans.append(sp)
    return RunPlan(config=config, input_uri=run.input, rundir=rundir, sources=sources, shards=selected,
                   caps=caps, stages=plans)


def _apply_limit(source_stage: Stage, sources: Mapping[int, Any], selected: Sequence[int],
                 limit: int) -> tuple[list[int], dict[int, int]]:
    """Keep the first `limit` source rows in shard order: whole shards, then part of one."""
    kept: list[int] = []
    caps: dict[int, int] = {}
    left = limit
    for shard in selected:
        if left <= 0:
            break
        n = _source_rows(source_stage, sources[shard])
        kept.append(shard)
        if n > left:
            caps[shard] = left
        left -= n
    return kept, caps


def _source_rows(source_stage: Stage, src: Any) -> int:
    start, end = getattr(src, "row_start", None), getattr(src, "row_end", None)
    if isinstance(start, int) and isinstance(end, int):
        return end - start
    return source_stage.read(src).num_rows  # type: ignore[attr-defined]


def config_for(stage_classes: Mapping[str, type[Stage]], **sections: Any) -> BaseModel:
    """A config for a custom set of stages (tests, embedding): sections as mappings or models."""
    return pipeline_config_model(tuple(stage_classes.items())).model_validate(sections)
