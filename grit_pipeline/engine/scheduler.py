"""The streaming driver: every stage at once over the shards of a run, on Ray.

Shards flow ingest -> chunks -> detect -> select -> compose concurrently. Each shard enters at its first
stage that is not committed (earlier committed outputs are its input), and each (stage, shard) is one
unit of work whose files a worker writes (`grit_pipeline.engine.shard_work`). When a worker reports, the driver
writes the shard's `_done` marker and the shard moves on; when compose commits, the final shard is
published (`grit_pipeline.engine.publish`, in shard order), so final shards appear minutes into a long run.

What keeps a long run bounded and the GPU busy:

- **Admission.** Shards enter in order, through two windows: at most one shard per actor of the stages
  up to detect (the stage with a prepare step: spaCy and detector actors) plus `run.shards_ahead` are
  between their first stage and the end of detect, so the CPU stages run a bounded number of shards
  ahead of the GPU and memory and disk stay bounded; and a shard with only the cheap stages after detect
  left (a re-run after `select.min_score` changed) enters while fewer than `task slots +
  run.shards_ahead` shards are past detect, enough to keep every task slot busy. Each pass of the loop
  looks only at the shards in flight, so its cost does not grow with the run's size.
- **Priorities.** Work goes to the lowest shard first, and feeding the GPU comes before other CPU work.
- **Decoded images are bounded.** Detect runs in parts of at most `part_rows` rows (a prepare task and
  an actor call each); the parts in existence, counting those being prepared, waiting, queued at an
  actor (at most `ACTOR_QUEUE` each) and running, hold at most `pool x (1 + queued_parts) x part_rows`
  rows (`run.resources.detect.*`), so decoded pixels stay within that many images (`queued_parts` is 1
  by default for a pixel detector, 8 for the replay backend, whose parts hold no pixels); a small
  shard's smaller parts are also at most `SMALL_PARTS` per full part of that bound, so decoding does not
  run shards ahead. Image reading and decoding run in CPU tasks ahead of the actors, so the GPU does not wait on
  them.
- **Small messages only.** Each stage's `StageSpec` goes into Ray's object store once and tasks get a
  reference; a source stage's task carries only its own shard's description. Stage outputs go straight
  from workers to the run directory; parts of a shard travel between tasks and actors through the
  object store by reference; the driver gets back `ShardReport`s and `PublishReport`s (counts, hashes)
  and holds a few references per shard in flight. `calls` counts the Ray calls submitted per stage.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from grit_pipeline.engine.bookkeeping import Bookkeeper
from grit_pipeline.engine.plan import RunPlan, StagePlan
from grit_pipeline.engine.publish import PUBLISH, PublishFailure
from grit_pipeline.engine.ray_runtime import Fit, Remote, failure_details, failure_message
from grit_pipeline.engine.shard_work import ShardReport, StageSpec, part_step
from grit_pipeline.rundir.store import shard_name
from grit_pipeline.shard_ranges import ShardRanges
from stages.base import PreparedExecution

log = logging.getLogger(__name__)

ACTOR_QUEUE = 2  # most parts at a detect actor: one running, one queued, so it never idles between calls
POLL_S = 0.2
PUBLISH_BATCH = 64  # consecutive ready shards one publisher call takes at most
SMALL_PARTS = 4  # parts in existence per full part of the bound on prepared rows, when parts are small


@dataclass
class ShardFailure:
    stage: str
    shard: int
    message: str
    details: dict[str, Any] = field(default_factory=dict)  # input_file, key, error_type, traceback

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
class _Flow:
    """One shard's way through the stages of this run."""

    shard: int
    at: int  # index of the next stage to run
    end: int  # one past the last stage to run
    admitted: bool = False
    busy: bool = False
    failed: bool = False
    rows: dict[int, int] = field(default_factory=dict)  # stage index -> rows of its output (committed)

    @property
    def done(self) -> bool:
        return self.failed or self.at >= self.end


@dataclass
class _PartsJob:
    """A shard in a stage that runs in parts: prepare tasks, then actor calls, then one write task."""

    flow: _Flow
    stage: StagePlan
    rows_in: int
    step: int  # rows per part (the last one may have fewer)
    loads: list[Any]  # split outputs, one per part; dropped once their prepare task is submitted
    next_prepare: int = 0
    prepared: list[tuple[int, Any]] = field(default_factory=list)  # (part, ref) ready for an actor
    results: list[Any] = field(default_factory=list)  # actor call refs, by part
    finished: int = 0

    def rows(self, part: int) -> int:
        return min(self.step, self.rows_in - part * self.step)


class _ActorPool:
    """A stage's actors, their queued calls, and which of them may take work: the first from the start
    (Ray queues its calls while it loads), the others once they have loaded their model, so no shard
    waits in the queue of an actor still loading while a loaded one could take it."""

    def __init__(self, first: Any, per_actor: int):
        self.handles = [first]
        self.load = [0]
        self.ready = [True]
        self.per_actor = per_actor

    def add(self, handle: Any) -> int:
        self.handles.append(handle)
        self.load.append(0)
        self.ready.append(False)
        return len(self.handles) - 1

    def free(self) -> int | None:
        best = min((i for i in range(len(self.handles)) if self.ready[i]), key=lambda i: self.load[i], default=None)
        return best if best is not None and self.load[best] < self.per_actor else None


class Scheduler:
    """Runs a plan to the end (or to a stop) and says what happened to every shard."""

    def __init__(self, plan: RunPlan, fit: Fit, specs: dict[str, StageSpec], *, publisher_args: tuple | None,
                 bookkeeper: Bookkeeper, progress: bool = True, on_failure: Callable[[dict], None] | None = None):
        import ray

        self.ray = ray
        self.remote = Remote.get()
        self.plan, self.fit, self.specs = plan, fit, specs
        # each spec in the object store once: a task gets a reference, not a copy pickled into every call
        self.spec_refs = {name: ray.put(spec) for name, spec in specs.items()}
        self.calls: Counter[str] = Counter()  # stage -> Ray calls submitted for its shards (tasks, actor calls)
        self.stages = plan.stages
        self.rundir = plan.rundir
        self.keeper = bookkeeper
        self._view_at = 0.0
        self.on_failure = on_failure or (lambda info: None)  # info: stage, shard, message, details
        self.outcomes = {s.name: StageOutcome(s.name, s.fingerprint, cached=list(s.cached)) for s in self.stages}
        self.failures: dict[int, ShardFailure] = {}
        self.stop_requested = False
        self.stop_deadline = float("inf")
        self.abort_requested = False
        self.inflight: dict[Any, tuple[str, Any, bool]] = {}  # ref -> (kind, context, holds a task slot)
        self.tasks_running = 0
        self.parts_stage = next((s for s in self.stages if s.selected and s.resources.actor and s.has_prepare), None)
        if self.parts_stage is not None and not isinstance(self.parts_stage.execution, PreparedExecution):
            raise TypeError(f"stage {self.parts_stage.name!r} has a prepare step and an actor pool: its Execution "
                            "must derive from stages.base.PreparedExecution (queued_parts)")
        self.jobs: dict[int, _PartsJob] = {}
        self.rows_prepared = 0  # rows of the parts being prepared, waiting, or at an actor (decoded pixels)
        self.parts_prepared = 0  # ... and how many parts those are
        self.bars: dict[str, Any] = {}
        self.stage_named = {s.name: s for s in self.stages}
        self.active: dict[int, _Flow] = {}
        self.flows = self._flows()
        # flows in shard order not yet admitted (nor done), and admitted ones not yet done: what each pass
        # of the loop looks at, so its cost follows the shards in flight, not the run's size
        self.to_admit = [f for f in self.flows.values() if not f.done]
        self.to_admit.reverse()  # popped from the end: lowest shard first
        self.pools = self._pools()
        selected = [s for s in self.stages if s.selected]
        # one shard per actor of the stages up to detect (each holds a shard while it works), plus the
        # shards waiting for them: with fewer, a spaCy actor idles while its next shard waits for admission
        upto = self.parts_stage.index if self.parts_stage is not None else len(self.stages)
        self.window = plan.run.shards_ahead + sum(fit.stages[s.name].pool for s in selected
                                                  if s.resources.actor and s.index <= upto) + (
            0 if self.parts_stage is not None else fit.task_slots)
        # shards past the stage in parts (only cheap task stages left) admitted at once: one per task slot
        # plus as many ready to take a slot as soon as it frees
        self.cheap_window = fit.task_slots + plan.run.shards_ahead
        self.peak_in_flight = 0  # most shards admitted and not done at once
        self.publisher = None
        self.published: list[int] = []
        if publisher_args is not None:
            # every shard with a committed compose output is published (again, if a lower one changed)
            committed = set(self.stages[-1].committed)  # the plan's listing of compose's `_done/`
            self.publish_queue = sorted(set(plan.shards) | committed)
            self.committed_last = committed
            self.publisher = self.remote.publisher.options(num_cpus=0).remote(*publisher_args)
        else:
            self.publish_queue = []
            self.committed_last = set()
        self.publish_pos = 0
        self.publishing = False  # a publisher call in flight (one at a time: see _schedule_publish)
        self.published_ranges = ShardRanges()
        self.compose_shas: dict[int, str] = {}  # sha256 of compose outputs the publisher has not been given yet
        self.bars = self._bars(progress)

    # --- setup ---------------------------------------------------------------------------------------
    def _flows(self) -> dict[int, _Flow]:
        lo = next(i for i, s in enumerate(self.stages) if s.selected)
        hi = max(i for i, s in enumerate(self.stages) if s.selected) + 1
        committed = {s.index: set(s.cached) for s in self.stages}  # the plan's view, for selected shards
        flows = {}
        for shard in self.plan.shards:
            at = next((i for i in range(lo, hi) if shard not in committed[i]), hi)
            flow = _Flow(shard=shard, at=at, end=hi)
            if lo <= at < hi and at > 0 and shard not in committed[at - 1]:
                prev, stage = self.stages[at - 1], self.stages[at]
                self._fail(flow, stage.name, f"no committed {prev.name!r} output for this shard under fingerprint "
                                             f"{prev.fingerprint}: run the earlier stages first (drop --from {stage.name})")
            flows[shard] = flow
        return flows

    def _pools(self) -> dict[str, _ActorPool]:
        """One actor per pool at once; the rest join once it has loaded its model (`_done_ready`), so on a
        small machine the first actor of each stage is not slowed by its siblings loading alongside it."""
        pools = {}
        for s in self.stages:
            if not (s.selected and s.resources.actor) or not any(f.at <= s.index < f.end for f in self.flows.values()
                                                                 if not f.failed):
                continue
            per_actor = min(ACTOR_QUEUE, 1 + s.resources.queued_parts) if s is self.parts_stage else 1
            pools[s.name] = _ActorPool(self._new_actor(s.name), per_actor)
            if self.fit.stages[s.name].pool > 1:
                self._submit(pools[s.name].handles[0].ready.remote(), "ready", (s.name, 0))
        return pools

    def _new_actor(self, name: str) -> Any:
        place = self.fit.stages[name]
        # by value: an actor is made once per run, and a restarted actor must not depend on an object
        # whose loss Ray cannot recover from (ray-project/ray#53727)
        return self.remote.stage_actor.options(num_cpus=place.cpus, num_gpus=place.gpus).remote(self.specs[name])

    def _done_ready(self, ref: Any, ctx: tuple[str, int]) -> None:
        name, i = ctx
        pool = self.pools[name]
        if i == 0:  # the first actor has loaded: start the others
            for _ in range(self.fit.stages[name].pool - len(pool.handles)):
                handle = self._new_actor(name)
                self._submit(handle.ready.remote(), "ready", (name, pool.add(handle)))
            return
        try:
            self.ray.get(ref)
        except Exception as e:  # noqa: BLE001 - the pool goes on without it
            log.warning("stage %s: an extra actor failed to start (%s); going on with %d", name,
                        failure_message(e), sum(pool.ready))
            return
        pool.ready[i] = True

    def _bars(self, progress: bool) -> dict[str, Any]:
        from tqdm.auto import tqdm

        todo = {s.name: sum(1 for f in self.flows.values() if not f.failed and f.at <= s.index < f.end)
                for s in self.stages}
        return {s.name: tqdm(total=todo[s.name], desc=f"{s.name:<8}", unit="shard", disable=not progress or not todo[s.name],
                             position=i, leave=True) for i, s in enumerate(self.stages)}

    # --- the loop ------------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            while True:
                if self.abort_requested or time.monotonic() > self.stop_deadline:
                    self.cancel_inflight()
                    break
                if not self.stop_requested:
                    self._schedule()
                else:  # stopping: nothing new starts, but committed compose outputs still get published
                    self._schedule_publish()
                self._take_events()
                if not self.inflight:
                    if self.keeper.outstanding:  # markers being written: their shards move on after
                        self.keeper.wait(POLL_S)
                        continue
                    if self.stop_requested or self._finished():
                        break
                    if not self._schedule_possible():
                        break
                    continue
                self._publish_view()
                ready, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=POLL_S)
                if ready:
                    ready, _ = self.ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0)
                for ref in ready:
                    kind, ctx, task = self.inflight.pop(ref)
                    if task:
                        self.tasks_running -= 1
                    getattr(self, f"_done_{kind}")(ref, ctx)
        finally:
            for bar in self.bars.values():
                bar.close()

    def _finished(self) -> bool:
        return (not self.to_admit and not self.active and self.publish_pos >= len(self.publish_queue)
                and not self.keeper.outstanding)

    def _schedule_possible(self) -> bool:
        """Nothing in flight: make sure the loop is not stuck (it would be a bug); say why and stop."""
        self._schedule()
        if self.inflight:
            return True
        stuck = [f.shard for f in self.flows.values() if not f.done]
        if stuck or self.publish_pos < len(self.publish_queue):
            log.error("scheduler: nothing runs but shards %s are not done (publish at %d of %d)", stuck,
                      self.publish_pos, len(self.publish_queue))
            for shard in stuck:
                self._fail(self.flows[shard], self.stages[self.flows[shard].at].name, "not scheduled (internal error)")
        return False

    def _schedule(self) -> None:
        self._admit()
        self._schedule_publish()
        parts = self.parts_stage if self.parts_stage is not None and self.parts_stage.name in self.pools else None
        if parts is not None:
            self._start_jobs(parts)
            self._dispatch_parts(parts)
        for name, pool in self.pools.items():
            if self.stage_named[name] is not parts:
                self._schedule_actor_shards(name, pool)
        self._schedule_tasks(parts)

    # --- admission -----------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Admit shards in shard order while their window has room: shards before or in the stage in parts
        count against `window`, shards past it (only cheap stages left) against `cheap_window`. A full
        `cheap_window` also holds new shards back: the task stages after the bottleneck are behind, and
        admitting more would pile shards up there (every pass of the loop looks at them)."""
        bottleneck = self.parts_stage.index if self.parts_stage is not None else len(self.stages) - 1
        ahead = sum(1 for f in self.active.values() if f.at <= bottleneck)
        past = len(self.active) - ahead
        while self.to_admit:  # shard order
            flow = self.to_admit[-1]
            if flow.done:  # failed before it was admitted
                self.to_admit.pop()
                continue
            cheap = flow.at > bottleneck
            if past >= self.cheap_window or (not cheap and ahead >= self.window):
                break
            self.to_admit.pop()
            flow.admitted = True
            self.active[flow.shard] = flow
            past += cheap
            ahead += not cheap
        self.peak_in_flight = max(self.peak_in_flight, len(self.active))

    def _ready_flows(self, stage: StagePlan) -> list[_Flow]:
        return [f for f in self.active.values() if not f.busy and f.at == stage.index]

    # --- CPU tasks: one queue, by priority ---------------------------------------------------------
    def _schedule_tasks(self, parts: StagePlan | None) -> None:
        """Fill the free task slots. Tier 0 (urgent) first: prepare tasks while the detect actors do not
        have a queue's worth of prepared parts, and the tasks that feed an actor pool about to run dry
        (ingest for spaCy). Then everything else, lowest shard first, later stage first: work that finishes
        a shard beats work that starts one."""
        if self.tasks_running >= self.fit.task_slots:
            return
        candidates: list[tuple] = []
        starving = {s.index for s in self.stages if s.name in self.pools and s is not parts
                    and self._backlog(s) < sum(self.pools[s.name].ready)}
        for s in self.stages:
            if s.selected and not s.resources.actor:
                tier = 0 if s.index + 1 in starving else 1
                for f in self._ready_flows(s):
                    candidates.append((tier, f.shard, -s.index, 0, "shard", (f, s.name)))
        if parts is not None:
            candidates.extend(self._prepare_candidates(parts))
        heapq.heapify(candidates)
        while candidates and self.tasks_running < self.fit.task_slots:
            *_, kind, payload = heapq.heappop(candidates)
            if kind == "shard":
                flow, name = payload
                place = self.fit.stages[name]
                ref = self.remote.run_shard.options(num_cpus=place.cpus).remote(
                    self.spec_refs[name], flow.shard, *self._source(name, flow.shard))
                self.calls[name] += 1
                self._submit(ref, "report", (flow, name, None), task=True)
            else:
                job, part = payload
                ref = self.remote.prepare.options(num_cpus=self.fit.task_cpus).remote(
                    self.spec_refs[job.stage.name], job.flow.shard, job.loads[part])
                job.loads[part] = None  # the task holds it now
                job.next_prepare = part + 1
                self.rows_prepared += job.rows(part)
                self.parts_prepared += 1
                self.calls[job.stage.name] += 1
                self._submit(ref, "prepared", (job, part), task=True)

    def _source(self, name: str, shard: int) -> tuple[Any, int | None]:
        """A source stage's task gets its own shard's description and row cap; other stages nothing."""
        if self.stage_named[name].index:
            return None, None
        return self.plan.sources[shard], self.plan.caps.get(shard)

    def _backlog(self, stage: StagePlan) -> int:
        """Shards an actor pool is working on or could start now."""
        return sum(1 for f in self.active.values() if f.at == stage.index)

    def _schedule_actor_shards(self, name: str, pool: _ActorPool) -> None:
        stage = self.stage_named[name]
        for flow in self._ready_flows(stage):
            i = pool.free()
            if i is None:
                return
            pool.load[i] += 1
            self.calls[name] += 1
            self._submit(pool.handles[i].run_shard.remote(flow.shard, *self._source(name, flow.shard)), "report",
                         (flow, name, (pool, i)))

    def _submit(self, ref: Any, kind: str, ctx: Any, task: bool = False) -> None:
        """Track `ref` until it is ready, then `_done_<kind>(ref, ctx)`; a task holds one task slot."""
        if kind == "report":
            ctx[0].busy = True
        if task:
            self.tasks_running += 1
        self.inflight[ref] = (kind, ctx, task)

    def _done_report(self, ref: Any, ctx: tuple) -> None:
        flow, name, slot = ctx
        if slot is not None:
            pool, i = slot
            pool.load[i] -= 1
        flow.busy = False
        if flow.failed:  # failed meanwhile (its previous stage's marker could not be written)
            return
        try:
            report: ShardReport = self.ray.get(ref)
        except Exception as e:  # noqa: BLE001 - the shard fails, the run goes on
            self._fail(flow, name, failure_message(e), failure_details(e))
            return
        self._commit(flow, name, report)

    def _commit(self, flow: _Flow, name: str, report: ShardReport) -> None:
        """The stage's files for the shard are written: hand its marker to the bookkeeper and move the shard
        on (the next stage reads those files, not the marker). The marker's event (`_take_events`) counts
        the commit; compose's also lets the shard be published."""
        if flow.failed:  # an earlier stage's marker could not be written: this shard stops here
            return
        stage = self.stage_named[name]
        self.keeper.commit(name, flow.shard, report.marker(), report.stats())
        flow.rows[stage.index] = report.rows_out
        flow.at = stage.index + 1
        if stage.index == len(self.stages) - 1:  # what the publisher checks the final shard against
            self.compose_shas[flow.shard] = report.files[f"{shard_name(flow.shard)}.parquet"]["sha256"]
        if flow.done:
            self.active.pop(flow.shard, None)

    def _take_events(self) -> None:
        """Markers the bookkeeper has written (or could not write): count them, fail their shard."""
        last = self.stages[-1].name
        for ev in self.keeper.events():
            if ev.error is not None:  # the run directory refused the commit: nothing more of this shard counts
                flow = self.flows[ev.shard]
                if not flow.failed:
                    self._fail(flow, ev.stage, ev.error)
                continue
            self.outcomes[ev.stage].computed.append(ev.shard)
            self.bars[ev.stage].update(1)
            if ev.stage == last:
                self.committed_last.add(ev.shard)

    def _publish_view(self) -> None:
        """What progress.json says is in flight (at most once a second; O(shards in flight))."""
        now = time.monotonic()
        if now - self._view_at < 1.0:
            return
        self._view_at = now
        inflight: dict[str, list[int]] = {}
        for f in self.active.values():
            if not f.done:
                inflight.setdefault(self.stages[f.at].name, []).append(f.shard)
        self.keeper.set_view(stages={name: {"inflight": str(ShardRanges(shards))} for name, shards in inflight.items()},
                             failures=len(self.failures), published=len(self.published))

    def _fail(self, flow: _Flow, stage: str, message: str, details: dict[str, Any] | None = None) -> None:
        flow.failed = True
        flow.busy = False
        self.active.pop(flow.shard, None)
        if self._record_failure(stage, flow.shard, message, details):
            self.outcomes[stage].failed.append(flow.shard)
        if stage in self.bars:
            self.bars[stage].set_postfix(failed=len(self.outcomes[stage].failed), refresh=False)

    def _record_failure(self, stage: str, shard: int, message: str, details: dict[str, Any] | None) -> bool:
        """The shard's first failure is kept, logged and reported; False if it had one already."""
        if shard in self.failures:
            return False
        self.failures[shard] = ShardFailure(stage, shard, message, dict(details or {}))
        log.error("%s", self.failures[shard])
        self.on_failure({"stage": stage, "shard": shard, "message": message, **(details or {})})
        return True

    # --- the stage in parts (detect) ---------------------------------------------------------------
    def _start_jobs(self, stage: StagePlan) -> None:
        """Shards that reached the stage in parts: cut each one's input into parts (a loader task)."""
        spec = self.specs[stage.name]
        for flow in self._ready_flows(stage):
            rows = self._input_rows(flow, stage)
            if rows is None:
                continue
            step = part_step(spec, rows)
            parts = -(-rows // step)
            flow.busy = True
            job = _PartsJob(flow=flow, stage=stage, rows_in=rows, step=step, loads=[], results=[None] * parts)
            self.jobs[flow.shard] = job
            if parts == 0:
                self._write_job(job)
                continue
            loads = self.remote.split.options(num_cpus=self.fit.task_cpus, num_returns=parts).remote(
                self.spec_refs[stage.name], flow.shard, parts)
            self.calls[stage.name] += 1
            job.loads = [loads] if parts == 1 else list(loads)

    def _dispatch_parts(self, stage: StagePlan) -> None:
        """Hand prepared parts to actors with room in their queue, lowest shard and part first."""
        pool = self.pools[stage.name]
        for shard in sorted(self.jobs):
            job = self.jobs[shard]
            while job.prepared:
                i = pool.free()
                if i is None:
                    return
                part, ref = job.prepared.pop(0)
                pool.load[i] += 1
                call = pool.handles[i].process.remote(job.flow.shard, ref)
                self.calls[stage.name] += 1
                job.results[part] = call
                self._submit(call, "part", (job, part, pool, i))

    def _prepare_candidates(self, stage: StagePlan) -> list[tuple]:
        """The next parts to prepare, lowest shard and part first, while the parts in existence (being
        prepared, waiting, at an actor) hold at most `pool x (1 + queued_parts)` full parts' rows
        (`part_rows`), the bound on decoded pixels, and number at most SMALL_PARTS times that many parts:
        small shards' small parts keep a few parts' lead to hide the CPU tasks' latency without letting
        decoding run shards ahead. Urgent (tier 0) while the actors' queues could not be filled from what
        is prepared or preparing; beyond that they wait their turn with the other CPU work."""
        pool = self.pools[stage.name]
        jobs = [self.jobs[s] for s in sorted(self.jobs)]
        waiting = sum(len(j.prepared) for j in jobs) + sum(1 for k, *_ in self.inflight.values() if k == "prepared")
        rows, parts = self.rows_prepared, self.parts_prepared
        full_parts = len(pool.handles) * (1 + stage.resources.queued_parts)
        budget = full_parts * max(self.specs[stage.name].rows_per_part or 0, 1)
        most_parts = full_parts * SMALL_PARTS
        free_queue = sum(pool.per_actor - n for n, ready in zip(pool.load, pool.ready, strict=True) if ready)
        out = []
        for job in jobs:
            for part in range(job.next_prepare, len(job.loads)):
                if parts and (parts >= most_parts or rows + job.rows(part) > budget):
                    return out
                tier = 0 if waiting < free_queue + len(pool.handles) else 1
                out.append((tier, job.flow.shard, -stage.index, part, "prepare", (job, part)))
                rows += job.rows(part)
                parts += 1
                waiting += 1
        return out

    def _input_rows(self, flow: _Flow, stage: StagePlan) -> int | None:
        prev = stage.index - 1
        if prev in flow.rows:
            return flow.rows[prev]
        up = self.stages[prev]
        try:
            marker = self.rundir.markers(up.name, up.fingerprint, [flow.shard])[flow.shard]
        except Exception as e:  # noqa: BLE001
            self._fail(flow, stage.name, f"cannot read the {up.name} marker of shard {flow.shard}: {e}")
            return None
        flow.rows[prev] = int(marker["rows"])
        return flow.rows[prev]

    def _done_prepared(self, ref: Any, ctx: tuple) -> None:
        job, part = ctx
        job.prepared.append((part, ref))
        job.prepared.sort(key=lambda p: p[0])

    def _done_part(self, ref: Any, ctx: tuple) -> None:
        job, part, pool, i = ctx
        pool.load[i] -= 1
        self.rows_prepared -= job.rows(part)
        self.parts_prepared -= 1
        job.finished += 1
        if job.finished == len(job.results):
            self._write_job(job)

    def _write_job(self, job: _PartsJob) -> None:
        ref = self.remote.write_parts.options(num_cpus=self.fit.task_cpus).remote(
            self.spec_refs[job.stage.name], job.flow.shard, job.rows_in, *job.results)
        self.calls[job.stage.name] += 1
        del self.jobs[job.flow.shard]
        self._submit(ref, "report", (job.flow, job.stage.name, None), task=True)

    # --- publishing ----------------------------------------------------------------------------------
    def _schedule_publish(self) -> None:
        """One publisher call at a time, with every consecutive ready shard (up to PUBLISH_BATCH): the
        actor publishes in order anyway, and a call that knows what was published before it (`chain`) is
        what a restarted publisher resumes from."""
        if self.publisher is None or self.publishing:
            return
        batch: list[int] = []
        while self.publish_pos < len(self.publish_queue) and len(batch) < PUBLISH_BATCH:
            shard = self.publish_queue[self.publish_pos]
            flow = self.flows.get(shard)
            if flow is not None and flow.failed:
                self.publish_pos += 1
                continue
            if shard not in self.committed_last:
                break
            batch.append(shard)
            self.publish_pos += 1
        if not batch:
            return
        shas = {s: self.compose_shas.pop(s) for s in batch if s in self.compose_shas}
        self.publishing = True
        self._submit(self.publisher.publish.remote(batch, shas, str(self.published_ranges)), "published", batch)

    def _done_published(self, ref: Any, batch: list[int]) -> None:
        self.publishing = False
        try:
            results = self.ray.get(ref)
        except Exception as e:  # noqa: BLE001 - the publisher is gone: these shards fail, later ones go on
            for shard in batch:
                self._record_failure(PUBLISH, shard, failure_message(e), failure_details(e))
            return
        for r in results:
            if isinstance(r, PublishFailure):
                self._record_failure(PUBLISH, r.shard, r.message, r.details)
                continue
            self.published.append(r.shard)
            self.published_ranges.add(r.shard)

    def finish_publish(self) -> list[int]:
        """After a run that was not stopped: the publisher persists its index and removes the final shards
        published earlier that this run did not publish. Returns those."""
        if self.publisher is None:
            return []
        try:
            return self.ray.get(self.publisher.finish.remote())
        except Exception as e:  # noqa: BLE001 - the final shards stay; the next run removes the stale ones
            log.error("the publisher could not finish (stale final shards were not removed): %s", failure_message(e))
            return []

    # --- stopping ------------------------------------------------------------------------------------
    def request_stop(self, grace_s: float = float("inf")) -> None:
        """Stop scheduling new work; what is in flight may finish and commit for `grace_s` seconds, then
        it is cancelled (`run` then returns)."""
        self.stop_requested = True
        self.stop_deadline = min(self.stop_deadline, time.monotonic() + grace_s)

    def request_abort(self) -> None:
        """Stop at once: cancel what is in flight (nothing of it gets committed)."""
        self.stop_requested = True
        self.abort_requested = True

    def cancel_inflight(self) -> None:
        """Cancel what is still running (after a stop's grace period); nothing of it gets committed."""
        for ref in list(self.inflight):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - actor calls cannot be force-cancelled; they die with the actors
                pass
        self.inflight.clear()
        for pool in self.pools.values():
            for handle in pool.handles:
                self.ray.kill(handle)
        if self.publisher is not None:
            self.ray.kill(self.publisher)
