"""Ray side of the engine: start or join Ray, and stream one stage over its pending shards with Ray Data.

A stage runs as one Ray Data job over a dataset of shard ids:

- stages with a batch size: `load_rows` tasks read each shard's input and emit it in slices, then (if the
  stage has a `prepare_batch`, e.g. detect's image decoding) CPU tasks prepare each slice, then the stage
  runs as tasks, or as a fixed-size actor pool (`ActorPoolStrategy(size=N)`, `num_gpus`) for stateful
  stages (spaCy, the detector), with an explicit `batch_size`;
- stages without one (ingest, which must see a whole source shard to find duplicate keys): one call per
  shard, as a task or on the actor pool.

Every call yields envelopes (see `grit_pipeline.workers`) that the driver consumes as they stream out and
turns into per-shard commits. Why Ray Data rather than hand-rolled tasks: backpressure between the
decode tasks and the GPU actors, actor pools that keep models loaded across shards, and progress bars
come with it; per-shard commit only needs row counting, which the envelopes carry.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from grit_pipeline.workers import (
    ProcessActor,
    ShardActor,
    StageRuntime,
    load_rows,
    prepare_rows,
    process_rows,
    run_shards,
)

log = logging.getLogger(__name__)
LOADER_BLOCK_ROWS = 1024  # rows per block the input loaders emit (at least one batch)


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
    else:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=True)
    return True


def shutdown_ray() -> None:
    import ray

    ray.shutdown()


def cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())


@dataclass(frozen=True)
class Placement:
    """CPUs (and pool size) one stage's operators request, fitted to the cluster."""

    pool: int  # actors in the pool (0: the stage runs as tasks)
    stage_cpus: float  # per actor, or per task of a task stage
    loader_cpus: float  # per input-loading task
    prepare_cpus: float  # per prepare task


def fit_resources(rt: StageRuntime, cluster: dict[str, float], loader_cpus: float,
                  warn: bool = True) -> Placement:
    """Fit a stage's requests to the cluster so that they can all make progress.

    An actor pool holds its CPUs for the whole stage while its loader and prepare tasks need CPUs of
    their own; if the pool took everything the stage would wait forever. So up to one CPU (half the
    cluster on a tiny one) stays free for those tasks and the pool gets the rest: fewer actors than
    asked, or, on a one-CPU machine, a fractional CPU per actor."""
    res = rt.resources
    total = cluster.get("CPU", 0.0)
    side = min(1.0, total / 2)
    if not res.actor:
        return Placement(0, min(res.cpus, total) if total else res.cpus, min(loader_cpus, max(side, 0.1)),
                         min(1.0, total) if total else 1.0)
    pool = res.pool_size
    if res.cpus > 0 and total > 0:
        pool = min(pool, max(1, int((total - side) // res.cpus)))
    if res.gpus > 0:
        gpus = cluster.get("GPU", 0.0)
        if gpus < res.gpus:
            raise RuntimeError(f"stage {rt.name!r} needs {res.gpus:g} GPU per actor but the Ray cluster has "
                               f"{gpus:g}; run on a GPU cluster (--address) or set run.resources.{rt.name}.gpus=0 "
                               "with a CPU device in the stage config")
        pool = min(pool, max(1, int(gpus // res.gpus)))
    stage_cpus = min(res.cpus, (total - side) / pool) if total > 0 else res.cpus
    if warn and (pool < res.pool_size or stage_cpus < res.cpus):
        log.warning("stage %s: %d actor(s) x %g CPU do not fit the cluster (%g CPUs) next to the loading "
                    "tasks; using %d x %g", rt.name, res.pool_size, res.cpus, total, pool, stage_cpus)
    return Placement(pool, stage_cpus, min(loader_cpus, side), side)


def stream_stage(rt: StageRuntime, shards: Sequence[int], *, batch_size: int | None, loader_cpus: float,
                 prepare_memory_mb: int, progress: bool) -> Iterator[dict[str, Any]]:
    """Run one stage over `shards` on Ray Data; yield envelopes (dicts) as they complete."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.execution_options.preserve_order = False
    res = rt.resources
    fit = fit_resources(rt, cluster_resources(), loader_cpus)
    # Lost workers are retried by Ray Data's defaults (tasks retried; actors restarted, calls retried).
    actor_compute = ray.data.ActorPoolStrategy(size=fit.pool) if res.actor else None

    ds = ray.data.from_items([{"shard": int(s)} for s in shards], override_num_blocks=max(1, len(shards)))
    if batch_size is None:
        if res.actor:
            ds = ds.map_batches(ShardActor, fn_constructor_kwargs={"rt": rt}, batch_size=1,
                                batch_format="pyarrow", compute=actor_compute, num_cpus=fit.stage_cpus,
                                num_gpus=res.gpus)
        else:
            ds = ds.map_batches(run_shards, fn_kwargs={"rt": rt}, batch_size=1, batch_format="pyarrow",
                                num_cpus=fit.stage_cpus, num_gpus=res.gpus)
    else:
        block_rows = max(batch_size, LOADER_BLOCK_ROWS)
        ds = ds.map_batches(load_rows, fn_kwargs={"rt": rt, "block_rows": block_rows}, batch_size=1,
                            batch_format="pyarrow", num_cpus=fit.loader_cpus)
        if rt.has_prepare:
            # CPU tasks ahead of the actors, with memory reserved for the decoded pixels. The memory
            # request also keeps Ray Data from fusing this step into the actor pool (it fuses task->actor
            # maps whose remote args match), which would put the decoding back on the GPU workers.
            ds = ds.map_batches(prepare_rows, fn_kwargs={"rt": rt}, batch_size=batch_size,
                                batch_format="pyarrow", num_cpus=fit.prepare_cpus,
                                memory=prepare_memory_mb * 2**20)
        if res.actor:
            ds = ds.map_batches(ProcessActor, fn_constructor_kwargs={"rt": rt}, batch_size=batch_size,
                                batch_format="pyarrow", compute=actor_compute, num_cpus=fit.stage_cpus,
                                num_gpus=res.gpus)
        else:
            ds = ds.map_batches(process_rows, fn_kwargs={"rt": rt}, batch_size=batch_size,
                                batch_format="pyarrow", num_cpus=fit.stage_cpus, num_gpus=res.gpus)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from batch.to_pylist()
