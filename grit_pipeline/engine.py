"""The pipeline driver: plan a run (fingerprints, cached and pending shards), run stages in order on Ray,
commit each shard as soon as all of its rows are back, publish the final `grit/` shards and the stats.

    plan = build_plan(config, input_uri="data/in", output_uri="runs/a")
    result = execute(plan)          # RunResult: per-stage computed/cached/failed shards, failures
    result.ok                       # False if any shard failed (the CLI then exits non-zero)

Stages run one after another over the pending shards (ingest -> chunks -> detect -> select -> compose);
each stage is one Ray Data job (`grit_pipeline.ray_exec`). A shard committed under the current
fingerprint is never recomputed; a shard whose stage fails is reported with the stage, its input file
and the key where known, and is skipped by later stages while the other shards go on. A crash (even
SIGKILL of this process) loses only the shards in flight: everything committed stays.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from grit_pipeline import stats as stats_mod
from grit_pipeline.config import RunConfig, config_dict, parse_shard_spec
from grit_pipeline.fingerprint import chain_fingerprints, source_fingerprint
from grit_pipeline.rundir import RunDir, ShardFiles
from grit_pipeline.stage_io import conform_output, join_upstream, passthrough_fields
from grit_pipeline.workers import ROW, StageRuntime, from_ipc
from schemas.tables import REJECT_SCHEMA
from stages.base import Resources, Stage, StageConfig

log = logging.getLogger(__name__)


class PlanError(ValueError):
    """A run that cannot start: no input, unknown stage, nothing to read. The message says what to do."""


@dataclass
class StagePlan:
    name: str
    index: int
    cls: type[Stage]
    config: StageConfig
    execution: Any
    fingerprint: str
    resources: Resources
    has_prepare: bool
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
    config: Any  # PipelineConfig (or any object with one attribute per stage plus `run`)
    input_uri: str
    rundir: RunDir
    sources: dict[int, Any]  # shard index -> SourceShard
    shards: list[int]  # selected source shards, ascending
    caps: dict[int, int]  # shard -> max rows, from run.limit
    stages: list[StagePlan]

    @property
    def run(self) -> RunConfig:
        return self.config.run

    @property
    def fingerprints(self) -> dict[str, str]:
        return {s.name: s.fingerprint for s in self.stages}

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


@dataclass
class ShardFailure:
    stage: str
    shard: int
    message: str

    def __str__(self) -> str:
        return f"[{self.stage} shard {self.shard}] {self.message}"


@dataclass
class StageOutcome:
    name: str
    fingerprint: str
    computed: list[int] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    cleaned: list[str] = field(default_factory=list)  # leftovers of an interrupted run, removed


@dataclass
class RunResult:
    output: str
    stages: list[StageOutcome]
    failures: list[ShardFailure]
    final_shards: list[int]
    summary: dict[str, Any]

    @property
    def ok(self) -> bool:
        return not self.failures

    def stage(self, name: str) -> StageOutcome:
        return next(s for s in self.stages if s.name == name)


# --- planning ------------------------------------------------------------------------------------------
def default_stage_classes() -> dict[str, type[Stage]]:
    from stages.registry import STAGE_ORDER, stage_class

    return {name: stage_class(name) for name in STAGE_ORDER}


def build_plan(config: Any, *, input_uri: str | None = None, output_uri: str, shards: str | None = None,
               limit: int | None = None, from_stage: str | None = None, to_stage: str | None = None,
               stage_classes: Mapping[str, type[Stage]] | None = None, inspect_cache: bool = True) -> RunPlan:
    """Resolve what a run will do: sources, selected shards, fingerprints, and per stage which shards are
    already committed (cached) and which will run (pending). Reads the run directory, starts no Ray."""
    classes = dict(stage_classes) if stage_classes is not None else default_stage_classes()
    names = list(classes)
    run = config.run
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
        config = _with_run(config, run)
    if not run.input:
        raise PlanError("no input: pass --input URI (or set run.input in the config)")
    for flag, name in (("--from", from_stage), ("--to", to_stage)):
        if name is not None and name not in classes:
            raise PlanError(f"{flag} {name!r}: unknown stage; stages are {', '.join(names)}")
    lo = names.index(from_stage) if from_stage else 0
    hi = names.index(to_stage) if to_stage else len(names) - 1
    if lo > hi:
        raise PlanError(f"--from {from_stage} comes after --to {to_stage}")

    stage_cfgs = {n: _stage_config(config, n, classes[n]) for n in names}
    source_stage = classes[names[0]](stage_cfgs[names[0]])
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

    fps = chain_fingerprints(
        [(n, classes[n].version, stage_cfgs[n]) for n in names],
        source_fingerprint(run.input, run.limit))
    rundir = RunDir(output_uri, run.storage_options)
    plans = []
    for i, n in enumerate(names):
        execution = getattr(run.resources, n, None) or classes[n].Execution()
        stage = classes[n](stage_cfgs[n], execution)
        resources = stage.resources
        sp = StagePlan(name=n, index=i, cls=classes[n], config=stage_cfgs[n], execution=execution, fingerprint=fps[n],
                       resources=resources, has_prepare=type(stage).prepare_batch is not Stage.prepare_batch,
                       selected=lo <= i <= hi)
        if inspect_cache:
            done = rundir.committed(n, fps[n])
            sp.cached = [s for s in selected if s in done]
            sp.pending = [s for s in selected if s not in done]
        plans.append(sp)
    return RunPlan(config=config, input_uri=run.input, rundir=rundir, sources=sources, shards=selected,
                   caps=caps, stages=plans)


def _with_run(config: Any, run: RunConfig) -> Any:
    if hasattr(config, "model_copy"):
        return config.model_copy(update={"run": run})
    new = SimpleNamespace(**vars(config))
    new.run = run
    return new


def _stage_config(config: Any, name: str, cls: type[Stage]) -> StageConfig:
    cfg = getattr(config, name, None)
    if cfg is None:
        return cls.Config()
    if isinstance(cfg, Mapping):
        return cls.Config.model_validate(cfg)
    return cfg


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


# --- execution -----------------------------------------------------------------------------------------
@dataclass
class _Pending:
    total: int
    seen: np.ndarray
    outputs: list[pa.Table] = field(default_factory=list)
    rejects: list[pa.Table] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0


class ShardAssembler:
    """Gathers a stage's envelopes per shard; a shard is complete when each input row came back once."""

    def __init__(self, stage: str):
        self.stage = stage
        self.pending: dict[int, _Pending] = {}
        self.failed: dict[int, str] = {}

    def add(self, env: Mapping[str, Any]) -> tuple[int, _Pending | None, str | None]:
        """Returns (shard, complete state or None, error message or None)."""
        shard = int(env["shard"])
        if shard in self.failed:
            return shard, None, None
        if env["error"]:
            self.failed[shard] = env["error"]
            self.pending.pop(shard, None)
            return shard, None, env["error"]
        st = self.pending.get(shard)
        if st is None:
            total = int(env["total"])
            st = self.pending[shard] = _Pending(total=total, seen=np.zeros(total, dtype=bool))
        for key, parts in (("output", st.outputs), ("rejects", st.rejects)):
            if env[key] is None:
                continue
            table = from_ipc(env[key])
            rows = table[ROW].to_numpy()
            fresh = ~st.seen[rows]
            if not fresh.all():  # a retried call delivered rows twice: keep the first copy
                table, rows = table.filter(pa.array(fresh)), rows[fresh]
            st.seen[rows] = True
            parts.append(table)
        st.seconds += float(env["seconds"])
        st.peak_rss_mb = max(st.peak_rss_mb, float(env["peak_rss_mb"]))
        if st.seen.all():
            return shard, self.pending.pop(shard), None
        return shard, None, None


def _assemble(parts: list[pa.Table], empty_schema: pa.Schema) -> pa.Table:
    if not parts:
        return empty_schema.empty_table()
    table = pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]
    table = table.take(pc.sort_indices(table[ROW]))
    return table.drop_columns([ROW])


def _runtime(plan: RunPlan, sp: StagePlan) -> StageRuntime:
    n = len(plan.stages)
    return StageRuntime(
        name=sp.name, cls=sp.cls, config=sp.config, execution=sp.execution, fingerprint=sp.fingerprint,
        resources=sp.resources,
        rundir=plan.rundir,
        upstream=tuple((p.name, p.fingerprint) for p in plan.stages[: sp.index]),
        extras="any" if sp.index == 0 else ("passthrough" if sp.index == n - 1 else "none"),
        sources={s: plan.sources[s] for s in plan.shards} if sp.index == 0 else {},
        caps=dict(plan.caps) if sp.index == 0 else {},
        has_prepare=sp.has_prepare,
    )


def _empty_output(plan: RunPlan, sp: StagePlan, shard: int) -> pa.Table:
    """Output of a shard with no input rows. Only the final stage may add passthrough columns, so for it
    the stage itself is asked (on an empty input with the upstream schemas); others have a fixed schema."""
    if sp.index == 0 or sp.index < len(plan.stages) - 1:
        return sp.cls.output_schema.empty_table()
    upstream = plan.stages[: sp.index]
    empty = join_upstream([p.name for p in upstream],
                          [plan.rundir.read_schema(p.name, p.fingerprint, shard).empty_table() for p in upstream])
    stage = sp.cls(sp.config, sp.execution)
    out = stage.process_batch(stage.prepare_batch(empty).output).output
    return conform_output(sp.name, out, sp.cls.output_schema,
                          allowed_extra=[f.name for f in passthrough_fields(empty.schema)])


def execute(plan: RunPlan, *, progress: bool | None = None) -> RunResult:
    """Run the planned stages on Ray (local unless `run.address`), committing shard by shard."""
    from grit_pipeline import ray_exec

    run = plan.run
    progress = run.progress if progress is None else progress
    rundir = plan.rundir
    rundir.clean_tmp()
    rundir.write_text("run.yaml", yaml.safe_dump(
        {**_config_data(plan), "fingerprints": plan.fingerprints}, sort_keys=False, allow_unicode=True))
    started = ray_exec.ensure_ray(run.address, run.num_cpus, run.num_gpus, run.forward_env)
    failures: dict[int, ShardFailure] = {}
    outcomes: list[StageOutcome] = []
    try:
        cluster = ray_exec.cluster_resources()
        for sp in plan.stages:  # a stage that cannot be placed (GPUs missing) stops the run before it starts
            if sp.selected and (sp.pending or not sp.cached):
                try:
                    ray_exec.fit_resources(_runtime(plan, sp), cluster, run.loader_cpus, warn=False)
                except RuntimeError as e:
                    raise PlanError(str(e)) from None
        for sp in plan.stages:
            if sp.selected:
                outcomes.append(_run_stage(plan, sp, failures, progress))
        final = _publish(plan) if plan.stages[-1].selected else rundir.final_shards()
    finally:
        if started:
            ray_exec.shutdown_ray()
    summary = write_summary(rundir, [s.name for s in plan.stages], plan.fingerprints)
    rundir.clean_tmp()
    return RunResult(output=rundir.uri, stages=outcomes, failures=sorted(failures.values(), key=lambda f: f.shard),
                     final_shards=final, summary=summary)


def _config_data(plan: RunPlan) -> dict[str, Any]:
    cfg = plan.config
    if hasattr(cfg, "model_dump"):
        return config_dict(cfg)
    data = {s.name: s.config.model_dump(mode="json") for s in plan.stages}
    data["run"] = cfg.run.model_dump(mode="json")
    return data


def _run_stage(plan: RunPlan, sp: StagePlan, failures: dict[int, ShardFailure], progress: bool) -> StageOutcome:
    from grit_pipeline import ray_exec

    rundir = plan.rundir
    outcome = StageOutcome(sp.name, sp.fingerprint)
    outcome.cleaned = rundir.clean_uncommitted(sp.name, sp.fingerprint)
    done = rundir.committed(sp.name, sp.fingerprint)
    outcome.cached = [s for s in plan.shards if s in done]
    todo = [s for s in plan.shards if s not in done and s not in failures]

    def fail(shard: int, message: str) -> None:
        failures[shard] = ShardFailure(sp.name, shard, message)
        outcome.failed.append(shard)
        log.error("%s", failures[shard])

    if sp.index > 0 and todo:
        prev = plan.stages[sp.index - 1]
        up = rundir.committed(prev.name, prev.fingerprint)
        for s in [s for s in todo if s not in up]:
            fail(s, f"no committed {prev.name!r} output for this shard under fingerprint {prev.fingerprint}: "
                    f"run the earlier stages first (drop --from {sp.name})")
        todo = [s for s in todo if s in up]
        # Shards whose input is empty (every row rejected upstream) commit an empty output right here.
        rows = {s: m["rows"] for s, m in rundir.markers(prev.name, prev.fingerprint, todo).items()}
        for s in [s for s in todo if rows[s] == 0]:
            _commit(plan, sp, s, _empty_output(plan, sp, s), REJECT_SCHEMA.empty_table(), 0, 0.0, 0.0)
            outcome.computed.append(s)
        todo = [s for s in todo if rows[s] > 0]
    log.info("stage %s [%s]: %d shard(s) cached, %d to run", sp.name, sp.fingerprint, len(outcome.cached), len(todo))
    if not todo:
        return outcome

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"{sp.name:<8}", unit="shard", disable=not progress, leave=True)
    assembler = ShardAssembler(sp.name)
    rows_done = 0
    rt = _runtime(plan, sp)
    batch_size = sp.resources.batch_size
    if sp.index == 0:
        batch_size = None  # the source stage sees whole shards (duplicate keys are found per shard)
    elif sp.has_prepare and batch_size is None:
        batch_size = 64  # a prepare step streams into the actors in batches
    try:
        for env in ray_exec.stream_stage(rt, todo, batch_size=batch_size, loader_cpus=plan.run.loader_cpus,
                                         prepare_memory_mb=plan.run.prepare_memory_mb, progress=progress):
            shard, complete, error = assembler.add(env)
            if error is not None:
                fail(shard, error)
                bar.update(1)
            elif complete is not None:
                output = _assemble(complete.outputs, sp.cls.output_schema)
                if not complete.outputs:
                    output = _empty_output(plan, sp, shard)
                rejects = _assemble(complete.rejects, REJECT_SCHEMA)
                try:
                    _commit(plan, sp, shard, output, rejects, complete.total, complete.seconds,
                            complete.peak_rss_mb)
                    outcome.computed.append(shard)
                    rows_done += complete.total
                except ValueError as e:  # stats that do not balance
                    fail(shard, f"stage {sp.name!r}: {e}")
                except OSError as e:  # the run directory refused a write: nothing of this shard is committed
                    fail(shard, f"stage {sp.name!r}: cannot write shard {shard} under {rundir.uri}: {e}")
                bar.update(1)
                bar.set_postfix(rows=rows_done, refresh=False)
    except Exception as e:  # noqa: BLE001 - Ray Data aborted the stage: what committed stays committed
        for s in todo:
            if s not in outcome.computed and s not in failures:
                fail(s, f"stage {sp.name!r} aborted before this shard committed: {type(e).__name__}: {e}")
    finally:
        bar.close()
    for s in todo:
        if s not in outcome.computed and s not in failures:
            st = assembler.pending.get(s)
            got = int(st.seen.sum()) if st is not None else 0
            want = st.total if st is not None else "?"
            fail(s, f"stage {sp.name!r}: only {got} of {want} input rows came back from the workers")
    outcome.computed.sort()
    outcome.failed.sort()
    log.info("stage %s: %d shard(s) computed, %d failed in %.1f s", sp.name, len(outcome.computed),
             len(outcome.failed), time.perf_counter() - t0)
    return outcome


def _commit(plan: RunPlan, sp: StagePlan, shard: int, output: pa.Table, rejects: pa.Table, rows_in: int,
            seconds: float, peak_rss_mb: float) -> None:
    st = stats_mod.shard_stats(sp.name, shard, sp.fingerprint, rows_in, output, rejects, seconds, peak_rss_mb)
    plan.rundir.commit_shard(sp.name, sp.fingerprint, shard, ShardFiles(output, rejects, st.to_json()))


def _publish(plan: RunPlan) -> list[int]:
    last = plan.stages[-1]
    committed = sorted(plan.rundir.committed(last.name, last.fingerprint))
    copied, removed = plan.rundir.publish_final(last.fingerprint, committed, stage=last.name)
    log.info("final shards: %d (%d copied, %d stale removed)", len(committed), len(copied), len(removed))
    return committed


def write_summary(rundir: RunDir, stage_order: Sequence[str], fingerprints: Mapping[str, str]) -> dict[str, Any]:
    """Merge every committed shard's stats under the current fingerprints into `report/summary.json`."""
    per_stage = {}
    for stage in stage_order:
        fp = fingerprints[stage]
        shards = sorted(rundir.committed(stage, fp))
        per_stage[stage] = list(rundir.read_stats(stage, fp, shards).values())
    summary = stats_mod.merge(stage_order, per_stage, fingerprints)
    rundir.write_json("report/summary.json", summary)
    return summary


def summary_from_run(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Re-merge the stats of an existing run (uses the fingerprints recorded in its run.yaml)."""
    rundir = RunDir(uri, storage_options)
    if not rundir.exists("run.yaml"):
        raise PlanError(f"{uri}: not a run directory (no run.yaml); pass the --output of a `grit run`")
    fps = yaml.safe_load(rundir.read_bytes(rundir.path("run.yaml"))).get("fingerprints") or {}
    return write_summary(rundir, list(fps), fps)


def shards_of(values: Iterable[int]) -> str:
    """Compact text of shard numbers: [0, 1, 2, 5] -> '0-2,5'."""
    out, run = [], []
    for v in sorted(values):
        if run and v == run[-1] + 1:
            run.append(v)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [v]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)
