"""Running a plan: the entry point the CLI and the Python API call.

    plan = build_plan(config, input_uri="data/in", output_uri="runs/a")   # grit_pipeline.engine.plan
    result = execute(plan)          # RunResult: per-stage computed/cached/failed shards, failures
    result.ok                       # False if any shard failed (the CLI then exits non-zero)

`execute` prepares the run directory (removes what an interrupted run left, writes `run.yaml`), starts
or joins Ray, fits the stages' workers to the cluster, and hands the shards to the streaming scheduler
(`grit_pipeline.engine.scheduler`): all stages run at once, each shard entering at its first uncommitted stage,
workers writing their own outputs, the driver committing shard by shard and publishing final shards in
order. At the end it removes final shards no longer backed by a compose output, and merges the stats
(`grit_pipeline.engine.summary`). A crash (even SIGKILL of this process) loses only the shards in flight.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from grit_pipeline.config import config_dict
from grit_pipeline.engine.bookkeeping import Bookkeeper, clean_leftovers, committed_shas, open_ledgers
from grit_pipeline.engine.plan import PlanError, RunPlan, StagePlan, build_plan, default_stage_classes
from grit_pipeline.engine.scheduler import ShardFailure, StageOutcome
from grit_pipeline.engine.shard_work import StageSpec
from grit_pipeline.engine.summary import summary_from_run, write_summary
from grit_pipeline.shard_ranges import ShardRanges
from grit_pipeline.version import __version__

__all__ = ["PlanError", "RunPlan", "RunResult", "ShardFailure", "StageOutcome", "build_plan",
           "default_stage_classes", "execute", "summary_from_run", "write_summary"]

log = logging.getLogger(__name__)

FAILURE_CHARS = 500  # of a failure's message in the stage's ledger (failures.jsonl keeps it whole)
LAYOUT = 2  # run directory layout written by this engine (run.yaml `layout:`); 1 = the stage-by-stage engine


@dataclass
class RunResult:
    output: str
    stages: list[StageOutcome]
    failures: list[ShardFailure]
    final_shards: list[int]
    summary: dict[str, Any]
    stopped: str | None = None  # "SIGINT" / "SIGTERM" when the run was stopped before the end
    exit_code: int | None = None  # 130 / 143 for a stopped run
    ray_calls: dict[str, int] = field(default_factory=dict)  # stage -> Ray calls submitted for its shards

    @property
    def ok(self) -> bool:
        return not self.failures and self.stopped is None

    def stage(self, name: str) -> StageOutcome:
        return next(s for s in self.stages if s.name == name)


def stage_spec(plan: RunPlan, sp: StagePlan) -> StageSpec:
    """What a worker needs to run stage `sp` of `plan`, on any shard: nothing per shard (the scheduler
    gives a source stage's task its own shard's description), so its size does not grow with the run."""
    n = len(plan.stages)
    batch = sp.resources.batch_size if sp.index > 0 else None  # the source stage sees whole shards
    return StageSpec(
        name=sp.name, cls=sp.cls, config=sp.config, execution=sp.execution, fingerprint=sp.fingerprint,
        rundir=plan.rundir, upstream=tuple((p.name, p.fingerprint) for p in plan.stages[: sp.index]),
        extras="any" if sp.index == 0 else ("passthrough" if sp.index == n - 1 else "none"),
        batch_rows=batch, part_rows=sp.resources.part_rows if sp.index > 0 else None,
        allowed_images=plan.allowed_images)


def check_writable(rundir) -> None:
    """Refuse a run directory where a folder the run writes is a file (OSError naming it), before any
    work starts rather than at the first commit."""
    import errno

    from grit_pipeline.engine.publish import PUBLISH
    from grit_pipeline.rundir.store import FINAL

    for name in ("stages", FINAL, PUBLISH, "report", "_tmp"):
        path = rundir.path(name)
        if rundir.fs.isfile(path):
            raise OSError(errno.ENOTDIR, f"{rundir.url(name)} is a file where the run keeps a folder; move it away",
                          rundir.url(name))


def semantic_config(plan: RunPlan) -> dict[str, Any]:
    """Every stage's semantic config as JSON values, file inputs by their normalized location (so the
    same file spelled two ways gives the same final shard bytes); no execution settings."""
    from grit_pipeline.engine.fingerprint import file_input_fields, is_url, normalize_uri

    out = {}
    for s in plan.stages:
        data = s.config.model_dump(mode="json")
        for name in file_input_fields(type(s.config)):
            value = data.get(name)
            if value and (is_url(value) or os.path.exists(os.path.expanduser(value))):
                data[name] = normalize_uri(value)
        out[s.name] = data
    return out


def final_metadata(plan: RunPlan) -> dict[bytes, bytes]:
    """Parquet key-value metadata of every final shard (`grit_pipeline.engine.card`): pipeline version, each
    stage's name, version and fingerprint, and the semantic config."""
    from grit_pipeline.engine.card import shard_metadata

    stages = [{"name": s.name, "version": s.cls.version, "fingerprint": s.fingerprint} for s in plan.stages]
    return shard_metadata(__version__, stages, semantic_config(plan))


def write_card(plan: RunPlan, summary: dict[str, Any], command: str, sizes: dict[int, int]) -> str:
    """`<run>/grit/README.md`, the Hub dataset card of the final shards (`sizes`: shard -> bytes, ascending);
    returns its path."""
    import pyarrow.parquet as pq

    from grit_pipeline.engine.card import dataset_card
    from grit_pipeline.rundir.store import FINAL
    from schemas.tables import GRIT_SCHEMA

    rundir = plan.rundir
    shards = list(sizes)
    schema = (pq.read_schema(rundir.final_path(shards[0]), filesystem=rundir.fs) if shards else GRIT_SCHEMA)
    text = dataset_card(summary=summary, config=semantic_config(plan), fingerprints=plan.fingerprints,
                        schema=schema.remove_metadata(), command=command,
                        shard_files=[os.path.basename(rundir.final_path(s)) for s in shards],
                        num_bytes=sum(sizes.values()), pipeline_version=__version__)
    return rundir.write_text(f"{FINAL}/README.md", text)


def execute(plan: RunPlan, *, progress: bool | None = None, command: str | None = None) -> RunResult:
    """Run the planned stages on Ray (local unless `run.address`), committing shard by shard.

    Holds the run directory's lease for the whole run (`grit_pipeline.rundir.lease`: a second run on the same
    directory raises `LeaseHeld`), writes the run's log lines to `<run>/logs/` and every shard failure to
    `<run>/failures.jsonl`. `command` is what the lease and log say started the run (default: argv)."""
    import shlex
    import sys

    from grit_pipeline.rundir.lease import Lease
    from grit_pipeline.rundir.runlog import FailureLog, RunLogHandler, run_started

    check_writable(plan.rundir)
    command = command or shlex.join(sys.argv)
    lease = Lease.acquire(plan.rundir, stale_after_s=plan.run.lease_stale_s, command=command)
    started_at = run_started()
    handler = RunLogHandler(plan.rundir, started_at)
    logging.getLogger().addHandler(handler)
    try:
        log.info("grit run %s -> %s (%d shards), lease held", plan.input_uri, plan.rundir.uri, len(plan.shards))
        return _execute(plan, progress, lease, FailureLog(plan.rundir, started_at), command)
    finally:
        lease.release()
        logging.getLogger().removeHandler(handler)
        handler.close()


def _execute(plan: RunPlan, progress: bool | None, lease: Any, failure_log: Any, command: str) -> RunResult:
    from grit_pipeline.engine.publish import PUBLISH
    from grit_pipeline.engine.ray_runtime import cluster_resources, ensure_ray, fit_cluster, shutdown_ray
    from grit_pipeline.engine.scheduler import Scheduler
    from grit_pipeline.engine.stopping import StopSignals

    run = plan.run
    progress = run.progress if progress is None else progress
    rundir = plan.rundir
    rundir.clean_tmp()
    rundir.write_text("run.yaml", yaml.safe_dump(
        {**config_dict(plan.config), "fingerprints": plan.fingerprints, "layout": LAYOUT,
         "planned_shards": str(ShardRanges(plan.shards)),
         **({"allowed_images": plan.allowed_images.to_config()} if plan.allowed_images is not None else {})},
        sort_keys=False, allow_unicode=True))
    ledgers = open_ledgers(plan)
    cleaned = clean_leftovers(plan, ledgers)
    keeper = Bookkeeper(rundir, ledgers, stage_order=[s.name for s in plan.stages], fingerprints=plan.fingerprints,
                        view={"run_start": failure_log.run_start, "planned": str(ShardRanges(plan.shards)),
                              "command": command})
    last = plan.stages[-1]
    fingerprints = {**plan.fingerprints, PUBLISH: last.fingerprint}

    def on_failure(info: dict[str, Any]) -> None:
        fields = {k: info.get(k) for k in ("input_file", "key", "error_type", "traceback")}
        keeper.fail(info["stage"], info["shard"], {"failed": str(info["message"])[:FAILURE_CHARS],
                                                   "error_type": info.get("error_type"), "key": info.get("key")})
        try:
            failure_log.record(stage=info["stage"], shard=info["shard"], message=info["message"],
                               fingerprint=fingerprints.get(info["stage"]), **fields)
        except OSError as e:
            log.error("cannot record the failure in %s: %s", failure_log.url, e)

    started = ensure_ray(run.address, run.num_cpus, run.num_gpus, run.forward_env)
    state = "failed"  # what progress.json says if the scheduler raises
    try:
        try:
            fit = fit_cluster({s.name: s.resources for s in plan.stages if s.selected}, cluster_resources())
        except RuntimeError as e:  # a stage that cannot be placed (GPUs missing): stop before anything runs
            raise PlanError(str(e)) from None
        specs = {s.name: stage_spec(plan, s) for s in plan.stages if s.selected}
        publisher = (rundir, last.name, last.fingerprint, final_metadata(plan)) if last.selected else None
        scheduler = Scheduler(plan, fit, specs, publisher_args=publisher, progress=progress, on_failure=on_failure,
                              bookkeeper=keeper)
        for name, paths in cleaned.items():
            scheduler.outcomes[name].cleaned = paths
        if last.selected:  # what earlier runs committed of compose, from its ledger: no marker read per shard
            scheduler.compose_shas.update(committed_shas(rundir, last.name, last.fingerprint, last.committed))
        # someone took the run directory over (our heartbeat was too old): stop writing into it at once
        lease.start_heartbeat(on_lost=lambda e: scheduler.request_abort())
        signals = StopSignals(on_stop=lambda: scheduler.request_stop(run.stop_grace_s),
                              on_abort=scheduler.request_abort, grace_s=run.stop_grace_s)
        with signals:
            scheduler.run()
        state = "stopped" if signals.received else "finished"
        log.info("scheduler: Ray calls per stage %s; at most %d shards in flight", dict(scheduler.calls),
                 scheduler.peak_in_flight)
        # a stopped run published only part of grit/; a lost lease means the directory is not ours now
        if last.selected and not scheduler.stop_requested and lease.lost is None:
            removed = scheduler.finish_publish()  # the index flushed, final shards no longer backed removed
            log.info("final shards: %d published, %d stale removed", len(scheduler.published), len(removed))
    finally:
        if lease.lost is not None:
            keeper.abort()  # the directory is another run's now: write nothing more there
        else:
            keeper.close(state)  # markers of everything that finished, ledgers, progress.json
        if started:
            shutdown_ray()
    lease.check()  # LeaseLost: no summary, card or cleanup in the new owner's directory
    sizes = rundir.final_shard_sizes()  # the final shards and their sizes, from one listing
    final = list(sizes)
    summary = write_summary(rundir, [s.name for s in plan.stages], plan.fingerprints, folds=keeper.folds())
    if last.selected:
        write_card(plan, summary, command, sizes)
    rundir.clean_tmp()
    outcomes = []
    for s in plan.stages:
        if s.selected:
            o = scheduler.outcomes[s.name]
            o.computed.sort()
            o.failed.sort()
            outcomes.append(o)
    failures = sorted(scheduler.failures.values(), key=lambda f: f.shard)
    return RunResult(output=rundir.uri, stages=outcomes, failures=failures, final_shards=final, summary=summary,
                     stopped=signals.received, exit_code=signals.exit_code, ray_calls=dict(scheduler.calls))
