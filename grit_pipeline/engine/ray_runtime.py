"""The engine's Ray glue: start or join Ray, fit each stage's workers to the cluster, and the remote
tasks and actor classes the scheduler (`grit_pipeline.engine.scheduler`) submits.

Ray is imported only inside these functions, so planning and the CLI start without it. The work itself
lives in `grit_pipeline.engine.shard_work` (plain functions); this module only wraps it:

- `Remote.run_shard` / `StageActor.run_shard`: a whole-shard stage (ingest, select, compose as tasks;
  chunks on spaCy actors), writing its files and returning a `ShardReport`; a source stage's call carries
  its own shard's description (and row cap), never the run's list of sources;
- `Remote.split` -> `Remote.prepare` -> `StageActor.process` -> `Remote.write_parts`: a stage in parts
  (detect): the loader cuts the shard into parts, CPU tasks decode images, GPU actors detect, a last
  task writes the shard;
- `Remote.publisher`: publishes final shards in shard order (`grit_pipeline.engine.publish`).

Worker processes that die are replaced by Ray: tasks are retried (`TASK_RETRIES`), actors restarted and
their calls retried (`ACTOR_RESTARTS`); every write is atomic, so a retried call rewrites the same bytes.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from grit_pipeline.engine.shard_work import (
    PartResult,
    ShardFailed,
    ShardReport,
    StageSpec,
    prepare_part,
    process_part,
    run_shard,
    split_input,
    write_part_results,
)

log = logging.getLogger(__name__)

MIN_ACTOR_CPUS = 0.25  # on a small machine actors share CPUs down to this much each before the pool shrinks
TASK_RETRIES = 3  # a task whose worker process died is run again this many times
ACTOR_RESTARTS = 3  # a dead actor is restarted (model reloaded) and its calls retried this many times


def forwarded_env(patterns: Sequence[str]) -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if any(fnmatch.fnmatchcase(k, p) for p in patterns)}


def ensure_ray(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None,
               forward_env: Sequence[str] = ()) -> bool:
    """Connect to Ray (a cluster at `address`, or a new local instance). Returns True if we started it.

    An already initialized Ray (a notebook, the test suite) is reused as it is."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        runtime_env = {"env_vars": forwarded_env(forward_env)} if forward_env else None
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:  # "local": a new instance even when `ray start` left a cluster registered on this host
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 log_to_driver=True)
    return True


def shutdown_ray() -> None:
    import ray

    ray.shutdown()


def cluster_resources() -> dict[str, float]:
    """Total resources of the cluster, plus `min_node_CPU`: the CPUs of its smallest node."""
    import ray

    nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
    return {**ray.cluster_resources(), "min_node_CPU": min(nodes, default=0.0)}


@dataclass(frozen=True)
class Placement:
    """How many workers of a stage run and what each reserves, fitted to the cluster."""

    pool: int  # actors in the pool (0: the stage runs as tasks)
    cpus: float  # per actor, or per task
    gpus: float  # per actor


@dataclass(frozen=True)
class Fit:
    stages: dict[str, Placement]
    task_slots: int  # CPU tasks the scheduler keeps in flight at once
    task_cpus: float  # CPUs each helper task (loading, preparing, writing) reserves


def fit_cluster(resources: Mapping[str, Any], cluster: Mapping[str, float], warn: bool = True) -> Fit:
    """Fit every stage's requests to the cluster so that all of them can make progress at once.

    `resources` maps stage name -> `stages.base.Resources`. Actor pools hold their CPUs for the whole run,
    while tasks (ingest, prepare, select, compose, loading and writing) need CPUs of their own; if the
    pools took everything the run would stall. So the pools share at most half the CPUs (all but a quarter
    on a big cluster): on a small machine their actors get fractional CPUs (an actor is not always busy,
    and several spaCy actors keep two cores fuller than one), down to MIN_ACTOR_CPUS, and only then fewer
    actors than asked; tasks get the rest. A task reserves at most what is left of the smallest node once actors may have taken their share
    of it, so on a cluster of 1-CPU nodes a task still fits next to fractional actors on any node.
    A GPU stage asking for more GPUs than the cluster has is an error (RuntimeError) before anything runs."""
    total = float(cluster.get("CPU", 0.0))
    smallest = float(cluster.get("min_node_CPU", total))
    gpus_total = float(cluster.get("GPU", 0.0))
    actor_budget = max(total - max(1.0, total / 4), total / 2) if total else 0.0
    asked = {n: r for n, r in resources.items() if r.actor}
    cpu_asked = sum(r.cpus * r.pool_size for r in asked.values())
    scale = min(1.0, actor_budget / cpu_asked) if cpu_asked and total else 1.0
    placements: dict[str, Placement] = {}
    for name, r in asked.items():
        pool = r.pool_size
        if r.gpus > 0:
            if gpus_total < r.gpus:
                raise RuntimeError(
                    f"stage {name!r} needs {r.gpus:g} GPU per actor but the Ray cluster has {gpus_total:g}; run "
                    f"on a GPU cluster (--address) or set run.resources.{name}.gpus=0 and "
                    f"run.resources.{name}.device=cpu")
            pool = min(pool, max(1, int(gpus_total // r.gpus)))
        cpus = r.cpus
        if scale < 1.0:  # this pool's share of the actor budget: slivers of a CPU down to MIN_ACTOR_CPUS
            share = actor_budget * r.cpus * r.pool_size / cpu_asked  # per actor, then fewer actors
            pool = max(1, min(pool, int(share / MIN_ACTOR_CPUS + 1e-9)))
            cpus = min(r.cpus, share / pool)
        placements[name] = Placement(pool, round(cpus, 3), r.gpus)
        if warn and (pool < r.pool_size or cpus < r.cpus):
            log.warning("stage %s: %d actor(s) x %g CPU do not fit the cluster (%g CPUs) next to the tasks; "
                        "using %d x %g", name, r.pool_size, r.cpus, total, pool, round(cpus, 3))
    used = sum(p.pool * p.cpus for p in placements.values())
    free = max(total - used, 0.5) if total else 1.0
    task_cpus = max(0.05, round(min(1.0, free, smallest * (1 - used / total)) if total else 1.0, 3))
    for name, r in resources.items():
        if not r.actor:
            placements[name] = Placement(0, min(r.cpus, task_cpus), 0.0)
    return Fit(placements, task_slots=max(1, int(free // task_cpus + 1e-9)), task_cpus=task_cpus)


# --- remote work ---------------------------------------------------------------------------------------
class StageActor:
    """A long-lived worker of one stage: the model is loaded once (`setup`), then shards or parts."""

    def __init__(self, spec: StageSpec):
        self.spec = spec
        self.stage = spec.make(setup=True)

    def run_shard(self, shard: int, source: Any = None, cap: int | None = None) -> ShardReport:
        spec = self.spec.for_source(source, cap) if self.spec.is_source else self.spec
        return run_shard(spec, self.stage, shard)

    def process(self, shard: int, part: Any) -> PartResult:
        return process_part(self.spec, self.stage, shard, part)

    def ready(self) -> bool:
        return True


def _run_shard(spec: StageSpec, shard: int, source: Any = None, cap: int | None = None) -> ShardReport:
    """A whole-shard stage in a task; a source stage's task also gets its shard's description and cap."""
    if spec.is_source:
        spec = spec.for_source(source, cap)
    return run_shard(spec, spec.make(setup=True), shard)


def _prepare(spec: StageSpec, shard: int, part: Any) -> Any:
    return prepare_part(spec, _cpu_stage(spec), shard, part)


_CPU_STAGES: dict[tuple[str, str], Any] = {}


def _cpu_stage(spec: StageSpec):
    """The stage instance of a prepare task: one per process, never set up (no model in CPU tasks)."""
    key = (spec.name, spec.fingerprint)
    if key not in _CPU_STAGES:
        _CPU_STAGES[key] = spec.make(setup=False)
    return _CPU_STAGES[key]


def _write_parts(spec: StageSpec, shard: int, rows_in: int, *results: PartResult) -> ShardReport:
    return write_part_results(spec, shard, rows_in, results)


class Remote:
    """The remote functions and actor classes, made once per process on first use."""

    _made: Remote | None = None

    def __init__(self) -> None:
        import ray

        from grit_pipeline.engine.publish import Publisher

        self.run_shard = ray.remote(max_retries=TASK_RETRIES)(_run_shard)
        self.split = ray.remote(max_retries=TASK_RETRIES)(split_input)
        self.prepare = ray.remote(max_retries=TASK_RETRIES)(_prepare)
        self.write_parts = ray.remote(max_retries=TASK_RETRIES)(_write_parts)
        self.stage_actor = ray.remote(max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)(StageActor)
        self.publisher = ray.remote(max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)(Publisher)

    @classmethod
    def get(cls) -> Remote:
        if cls._made is None:
            cls._made = cls()
        return cls._made


def failure_details(exc: BaseException) -> dict[str, Any]:
    """Input file, key, error type and traceback of a failed remote call, as far as they are known."""
    cause = getattr(exc, "cause", None)
    if cause is not None and cause is not exc:
        return failure_details(cause)
    if isinstance(exc, ShardFailed):
        return exc.details()
    return {"error_type": type(exc).__name__, "traceback": str(exc)}


def failure_message(exc: BaseException) -> str:
    """The message of a failed remote call: the worker's ShardFailed text, or the Ray error's first line."""
    cause = getattr(exc, "cause", None)
    if cause is not None and cause is not exc:
        return failure_message(cause)
    text = str(exc).strip()
    return text.splitlines()[0] if text.startswith("ray::") or "Traceback" in text else text
