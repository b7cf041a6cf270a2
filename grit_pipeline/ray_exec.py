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


def fit_pool_size(rt: StageRuntime, resources: dict[str, float], loader_cpus: float) -> int:
    """The actor pool size, shrunk to what the cluster can hold next to one loader task."""
    res = rt.resources
    size = res.pool_size
    cpus = resources.get("CPU", 0.0)
    if res.cpus > 0:
        size = min(size, max(1, int((cpus - loader_cpus) // res.cpus)))
    if res.gpus > 0:
        gpus = resources.get("GPU", 0.0)
        if gpus < res.gpus:
            raise RuntimeError(f"stage {rt.name!r} needs {res.gpus:g} GPU per actor but the Ray cluster has "
                               f"{gpus:g}; run on a GPU cluster (--address) or set run.resources.{rt.name}.gpus=0 "
                               "with a CPU device in the stage config")
        size = min(size, max(1, int(gpus // res.gpus)))
    if size < res.pool_size:
        log.warning("stage %s: actor pool of %d does not fit the cluster (%s); using %d",
                    rt.name, res.pool_size, resources, size)
    return size


def stream_stage(rt: StageRuntime, shards: Sequence[int], *, batch_size: int | None, loader_cpus: float,
                 prepare_memory_mb: int, progress: bool) -> Iterator[dict[str, Any]]:
    """Run one stage over `shards` on Ray Data; yield envelopes (dicts) as they complete."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.execution_options.preserve_order = False
    res = rt.resources
    # Lost workers are retried by Ray Data's defaults (tasks retried; actors restarted, calls retried).
    if res.actor:
        pool = fit_pool_size(rt, cluster_resources(), loader_cpus)
        actor_compute = ray.data.ActorPoolStrategy(size=pool)

    ds = ray.data.from_items([{"shard": int(s)} for s in shards], override_num_blocks=max(1, len(shards)))
    if batch_size is None:
        if res.actor:
            ds = ds.map_batches(ShardActor, fn_constructor_kwargs={"rt": rt}, batch_size=1,
                                batch_format="pyarrow", compute=actor_compute, num_cpus=res.cpus,
                                num_gpus=res.gpus)
        else:
            ds = ds.map_batches(run_shards, fn_kwargs={"rt": rt}, batch_size=1, batch_format="pyarrow",
                                num_cpus=res.cpus, num_gpus=res.gpus)
    else:
        block_rows = max(batch_size, LOADER_BLOCK_ROWS)
        ds = ds.map_batches(load_rows, fn_kwargs={"rt": rt, "block_rows": block_rows}, batch_size=1,
                            batch_format="pyarrow", num_cpus=loader_cpus)
        if rt.has_prepare:
            # CPU tasks ahead of the actors, with memory reserved for the decoded pixels. The memory
            # request also keeps Ray Data from fusing this step into the actor pool (it fuses task->actor
            # maps whose remote args match), which would put the decoding back on the GPU workers.
            ds = ds.map_batches(prepare_rows, fn_kwargs={"rt": rt}, batch_size=batch_size,
                                batch_format="pyarrow", num_cpus=1, memory=prepare_memory_mb * 2**20)
        if res.actor:
            ds = ds.map_batches(ProcessActor, fn_constructor_kwargs={"rt": rt}, batch_size=batch_size,
                                batch_format="pyarrow", compute=actor_compute, num_cpus=res.cpus,
                                num_gpus=res.gpus)
        else:
            ds = ds.map_batches(process_rows, fn_kwargs={"rt": rt}, batch_size=batch_size,
                                batch_format="pyarrow", num_cpus=res.cpus, num_gpus=res.gpus)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from batch.to_pylist()
