"""Planning a run: which source shards, which fingerprints, and per stage which shards are already
committed (cached) and which will run (pending). Reads the input listing and lists each stage's
`_done/` once (O(shards / 1000) requests on an object store, the one listing of a run's start); starts no
Ray and imports no model library, so `grit plan` answers in a second or two.

A stage that the last run closed cleanly is not listed: where `progress.json` says that run `finished`,
with the stage at the same fingerprint and its ledger where that run left it, the ledger's committed
shards are the listing's (`ledger_committed`; a re-run of a finished run then reads O(stages) objects
before its work). Any run writes `progress.json` as `running` before its first marker, so a run that
stopped, crashed or failed leaves the next one listing. Markers stay the truth: after removing markers by
hand, delete `progress.json` and the next run lists every `_done/` and mends the ledgers from it.

    plan = build_plan(config, input_uri="data/in", output_uri="runs/a")
    plan.fingerprints            # {"ingest": "3f2a...", ..., "compose": "..."}
    plan.stage("detect").pending # shards detect will run

A shard enters the streaming pipeline (`grit_pipeline.engine.scheduler`) at its first selected stage that is
not committed; earlier stages' committed outputs are its input.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from grit_pipeline.config import RunConfig, parse_shard_spec, pipeline_config_model
from grit_pipeline.engine.fingerprint import chain_fingerprints, source_fingerprint
from grit_pipeline.errors import UserError, user_message
from grit_pipeline.rundir.ledger import LedgerReader, ledger_folder
from grit_pipeline.rundir.progress import read_progress
from grit_pipeline.rundir.store import RunDir
from grit_pipeline.shard_ranges import ShardRanges
from stages.base import Execution, Resources, Stage, StageConfig
from stages.sources.base import SourceSchemaError

log = logging.getLogger(__name__)


class PlanError(UserError, ValueError):
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
    committed: ShardRanges = field(default_factory=ShardRanges)  # every committed shard (one `_done/` listing)

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
    # where image references may point (the source stage's `image_allow_list`: the input and
    # ingest.external_images); the stages that read images get it, run.yaml records it
    allowed_images: Any = None

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
    import pyarrow as pa

    # what the source's listing and reads raise about the input itself (a garbage Parquet file says so
    # without its name, hence the input named here)
    input_errors = (OSError, pa.ArrowException, SourceSchemaError)
    try:
        discovered = list(source_stage.discover(run.input))  # type: ignore[attr-defined]
    except input_errors as e:
        raise _input_error(run.input, e) from None
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
        try:
            selected, caps = _apply_limit(source_stage, sources, selected, run.limit)
        except input_errors as e:
            raise _input_error(run.input, e) from None

    fps = chain_fingerprints([(n, classes[n].version, stage_cfgs[n]) for n in names],
                             source_fingerprint(run.input, run.limit))
    rundir = RunDir(output_uri, run.storage_options)
    if rundir.fs.isfile(rundir.root):
        raise PlanError(f"--output {output_uri}: a file, not a run directory (give a folder to create or resume)")
    listed: dict[str, ShardRanges] = {}
    if inspect_cache:  # each stage's `_done/` listed once, the stages side by side (pages of 1,000 on S3)
        listed = ledger_committed(rundir, fps)
        unlisted = [n for n in names if n not in listed]
        with ThreadPoolExecutor(max_workers=max(1, len(unlisted))) as pool:
            listed |= dict(zip(unlisted, pool.map(lambda n: ShardRanges(rundir.committed(n, fps[n])), unlisted),
                               strict=True))
    plans = []
    for i, n in enumerate(names):
        stage = classes[n](stage_cfgs[n], executions[n])
        sp = StagePlan(name=n, index=i, cls=classes[n], config=stage_cfgs[n], execution=executions[n],
                       fingerprint=fps[n], resources=stage.resources,
                       has_prepare=type(stage).has_prepare(), selected=lo <= i <= hi)
        if inspect_cache:
            sp.committed = listed[n]
            sp.cached = [s for s in selected if s in sp.committed]
            sp.pending = [s for s in selected if s not in sp.committed]
        plans.append(sp)
    allowed = getattr(source_stage, "image_allow_list", None)
    return RunPlan(config=config, input_uri=run.input, rundir=rundir, sources=sources, shards=selected,
                   caps=caps, stages=plans, allowed_images=allowed(run.input) if allowed else None)


def ledger_committed(rundir: RunDir, fingerprints: Mapping[str, str]) -> dict[str, ShardRanges]:
    """stage -> committed shards, from the ledgers of the stages the last run closed cleanly: its
    `progress.json` says `finished`, names the stage's fingerprint and the position its ledger was left at,
    and the ledger stands there now (nothing wrote to it since). Stages left out are to be listed."""
    progress = read_progress(rundir)
    if not progress or progress.get("state") != "finished":
        return {}
    out = {}
    for name, fp in fingerprints.items():
        seen = (progress.get("stages") or {}).get(name) or {}
        if seen.get("fingerprint") != fp or not isinstance(seen.get("ledger"), list):
            continue
        reader = LedgerReader(rundir, ledger_folder(name, fp))
        try:
            fold = reader.read()
        except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable: listed instead
            log.info("stage %s: ledger not readable (%s); listing _done/", name, e)
            continue
        if reader.found and list(reader.position) == list(seen["ledger"]):
            out[name] = fold.committed.copy()  # type: ignore[attr-defined]
    return out


def _input_error(uri: str, error: Exception) -> PlanError:
    message = user_message(error)
    return PlanError(message if uri in message else f"input {uri}: {message}")


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
