"""Engine mechanics without Ray: joining upstream outputs, the output contract, row accounting, the
worker side (errors name stage, shard, file and key; prepare rejects travel to the process step; a
shard's parts are written in row order and every row must come back once), stats balance, placement."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grit_pipeline.engine.ray_runtime import fit_cluster
from grit_pipeline.engine.shard_work import (
    ShardFailed,
    StageSpec,
    prepare_part,
    process_part,
    process_rows,
    run_shard,
    with_rows,
    write_part_results,
)
from grit_pipeline.engine.stats import ShardStats, merge
from grit_pipeline.rundir.store import RunDir
from schemas.tables import INGEST_SCHEMA
from stages.base import Execution, Resources, Stage, StageConfig, StageResult

UPPER_SCHEMA = pa.schema([pa.field("key", pa.string(), nullable=False), pa.field("upper", pa.string())])


class UpperConfig(StageConfig):
    fail_on: str | None = None  # a caption that makes process_batch raise
    lose: str | None = None  # a key process_batch silently drops


class UpperStage(Stage[UpperConfig]):
    """Upper-cases captions; rejects captions starting with 'x'."""

    name = "upper"
    version = 1
    Config = UpperConfig
    Execution = Execution
    output_schema = UPPER_SCHEMA

    def prepare_batch(self, table: pa.Table) -> StageResult:
        rejects = self.rejects()
        keep = []
        for key, cap in zip(table["key"].to_pylist(), table["caption"].to_pylist(), strict=True):
            if cap.startswith("bad"):
                rejects.add(key, "image_unreadable", f"prepare refused {cap!r}")
            else:
                keep.append(key)
        return StageResult(table.filter(pa.compute.is_in(table["key"], pa.array(keep, pa.string()))),
                           rejects.table())

    def process_batch(self, table: pa.Table) -> StageResult:
        rejects = self.rejects()
        keys, out = [], []
        for key, cap in zip(table["key"].to_pylist(), table["caption"].to_pylist(), strict=True):
            if cap == self.config.fail_on:
                raise RuntimeError(f"cannot handle {cap!r}")
            if key == self.config.lose:
                continue
            if cap.startswith("x"):
                rejects.add(key, "no_chunks", "starts with x")
            else:
                keys.append(key)
                out.append(cap.upper())
        return StageResult(pa.table({"key": keys, "upper": out}), rejects.table())


def _ingest(keys, captions, extra=None) -> pa.Table:
    n = len(keys)
    cols = {"key": keys, "shard": [0] * n, "url": [None] * n, "caption": captions, "width": [1] * n,
            "height": [1] * n, "image_ref": [None] * n, "image_offset": [None] * n, "image_size": [None] * n}
    fields = list(INGEST_SCHEMA)
    if extra:
        cols.update(extra)
        fields += [pa.field(k, pa.infer_type(v)) for k, v in extra.items()]
    return pa.Table.from_pydict(cols, schema=pa.schema(fields))


def _spec(tmp_path, batch_rows=None, **cfg) -> StageSpec:
    return StageSpec(name="upper", cls=UpperStage, config=UpperConfig(**cfg), execution=Execution(),
                     fingerprint="fp", rundir=RunDir(str(tmp_path)), upstream=(("ingest", "fp0"),),
                     batch_rows=batch_rows)


def _input(captions) -> pa.Table:
    return _ingest([f"k{i}" for i in range(len(captions))], captions)


def _committed_input(tmp_path, captions, shard=4) -> None:
    from grit_pipeline.rundir.store import ShardFiles
    from schemas.tables import REJECT_SCHEMA

    RunDir(str(tmp_path)).commit_shard("ingest", "fp0", shard, ShardFiles(_input(captions),
                                                                         REJECT_SCHEMA.empty_table(), {}))


def test_process_rows_returns_outputs_and_rejects_with_their_rows(tmp_path):
    spec = _spec(tmp_path)
    out, rej, _ = process_rows(spec, UpperStage(spec.config), 4, _input(["a dog", "x ray", "a cat"]),
                               np.array([10, 11, 12]))
    assert out.to_pydict() == {"key": ["k0", "k2"], "upper": ["A DOG", "A CAT"], "__row": [10, 12]}
    assert rej.select(["key", "reason", "__row"]).to_pydict() == {
        "key": ["k1"], "reason": ["no_chunks"], "__row": [11]}


def test_failing_batch_names_stage_shard_file_and_key(tmp_path):
    spec = _spec(tmp_path, fail_on="a cat")
    with pytest.raises(ShardFailed) as err:
        process_rows(spec, UpperStage(spec.config), 4, _input(["a dog", "a cat", "a cow"]), np.arange(3))
    msg = str(err.value)
    assert "stage 'upper' failed on shard 4" in msg
    assert "stages/ingest/fp0/shard-00004.parquet" in msg  # the shard's input file
    assert "at key 'k1'" in msg and "cannot handle 'a cat'" in msg


def test_a_stage_that_loses_a_row_fails_the_shard(tmp_path):
    spec = _spec(tmp_path, lose="k2")
    with pytest.raises(ShardFailed, match="neither output nor rejected 1 input row.*first key 'k2'"):
        process_rows(spec, UpperStage(spec.config), 4, _input(["a", "b", "c"]), np.arange(3))


def test_prepare_rejects_travel_to_the_process_step(tmp_path):
    spec = _spec(tmp_path)
    stage = UpperStage()
    part = with_rows(_input(["a dog", "bad image", "a cow"]), np.array([3, 4, 5]))
    prepared = prepare_part(spec, stage, 1, part)
    assert prepared.num_rows == 3 and prepared["__reason"].null_count == 2
    out, rej, _, _ = process_part(spec, stage, 1, prepared)
    assert out.to_pydict() == {"key": ["k0", "k2"], "upper": ["A DOG", "A COW"], "__row": [3, 5]}
    assert rej.select(["key", "stage", "reason", "__row"]).to_pylist() == [
        {"key": "k1", "stage": "upper", "reason": "image_unreadable", "__row": 4}]


def test_parts_are_written_in_row_order_whatever_order_they_come_in(tmp_path):
    spec = _spec(tmp_path)
    stage = UpperStage()
    captions = ["a dog", "x ray", "bad", "a cat", "a cow"]
    parts = [process_part(spec, stage, 2, prepare_part(spec, stage, 2, with_rows(_input(captions).slice(i, 2),
                                                                                np.arange(i, min(i + 2, 5)))))
             for i in (0, 2, 4)]
    forward = write_part_results(spec, 2, 5, parts)
    first = (tmp_path / "stages/upper/fp/shard-00002.parquet").read_bytes()
    backward = write_part_results(spec, 2, 5, parts[::-1])
    assert (tmp_path / "stages/upper/fp/shard-00002.parquet").read_bytes() == first
    assert forward.files == backward.files and forward.rows_out == 3
    assert forward.rejects == {"image_unreadable": 1, "no_chunks": 1}
    assert pq.read_table(tmp_path / "stages/upper/fp/shard-00002.parquet")["key"].to_pylist() == ["k0", "k3", "k4"]
    assert not (tmp_path / "stages/upper/fp/_done").exists()  # the driver commits, not the worker
    stats = json.loads((tmp_path / "stages/upper/fp/shard-00002.stats.json").read_text())
    assert stats["rows_in"] == 5 and stats["rows_out"] == 3
    marker = forward.marker()
    assert marker["rows"] == 3 and marker["rejects"] == 2
    data = (tmp_path / "stages/upper/fp/shard-00002.parquet").read_bytes()
    assert marker["files"]["shard-00002.parquet"]["size"] == len(data)


def test_an_actor_runs_a_big_part_in_slices_of_the_batch_size(tmp_path):
    """A part of many rows (few Ray calls per shard) is processed `batch_rows` rows per process_batch
    call (one forward batch each), with the same rows, rejects and order as one call over the part."""
    sizes = []

    class Recording(UpperStage):
        def process_batch(self, table):
            sizes.append(table.num_rows)
            return super().process_batch(table)

    captions = ["a dog", "x ray", "bad", "a cat", "a cow", "bad too", "an owl"]
    part = prepare_part(_spec(tmp_path), UpperStage(), 2, with_rows(_input(captions), np.arange(7)))
    sliced = process_part(_spec(tmp_path, batch_rows=3), Recording(), 2, part)
    assert sizes == [3, 2]  # the 4 prepared rows come first in a prepared part, then the 3 it rejected
    whole = process_part(_spec(tmp_path), UpperStage(), 2, part)
    assert sliced.output.equals(whole.output) and sliced.output["__row"].to_pylist() == [0, 3, 4, 6]
    assert sorted(sliced.rejects["__row"].to_pylist()) == [1, 2, 5]
    assert sorted(sliced.rejects.to_pylist(), key=lambda r: r["__row"]) == sorted(
        whole.rejects.to_pylist(), key=lambda r: r["__row"])


def test_parts_are_whole_batches_and_a_small_shard_still_has_several(tmp_path):
    from grit_pipeline.engine.shard_work import MIN_PARTS, part_step

    spec = replace(_spec(tmp_path, batch_rows=8), part_rows=512)
    parts = {rows: -(-rows // part_step(spec, rows)) for rows in (1, 200, 2000, 10_000)}
    assert parts == {1: 1, 200: 7, 2000: MIN_PARTS, 10_000: 20}  # 10k rows: 20 parts -> 42 Ray calls
    assert all(part_step(spec, rows) % 8 == 0 for rows in parts)  # whole forward batches
    assert part_step(replace(spec, batch_rows=512), 200) == 512  # one batch per part (replay): never cut


def test_a_source_task_carries_its_own_shard_only(tmp_path):
    """The spec every task gets is the same whatever the number of shards; a source task binds its own
    shard's description, which failures name."""
    import pickle

    from grit_pipeline.assets.synthetic import write_img2dataset
    from grit_pipeline.config import load_config
    from grit_pipeline.engine.plan import build_plan
    from grit_pipeline.engine.runner import stage_spec

    sizes = {}
    for shards in (2, 40):
        src = write_img2dataset(tmp_path / f"in{shards}", shards=shards, rows_per_shard=1, bad_rows=False)
        plan = build_plan(load_config(None, []), input_uri=str(src.root), output_uri=str(tmp_path / "run"),
                          inspect_cache=False)
        assert len(plan.shards) == shards
        spec = stage_spec(plan, plan.stages[0])
        sizes[shards] = len(pickle.dumps(spec.for_source(None, None)))
        with pytest.raises(ShardFailed, match="no source shard given"):
            run_shard(spec, spec.make(setup=False), 1)
        missing = spec.for_source(plan.sources[1].model_copy(update={"uri": str(tmp_path / "gone.parquet")}), None)
        with pytest.raises(ShardFailed, match=r"stage 'ingest' failed on shard 1 \(.*gone\.parquet\)"):
            run_shard(missing, missing.make(setup=False), 1)
    assert abs(sizes[40] - sizes[2]) < 16  # only the input folder's name differs


def test_a_part_missing_or_delivered_twice_fails_the_shard(tmp_path):
    spec = _spec(tmp_path)
    stage = UpperStage()
    parts = [process_part(spec, stage, 2, prepare_part(spec, stage, 2, with_rows(_input(["a", "b", "c", "d"]).slice(i, 2),
                                                                                np.arange(i, i + 2))))
             for i in (0, 2)]
    with pytest.raises(ShardFailed, match="input row 2 came back 0 times"):
        write_part_results(spec, 2, 4, parts[:1])
    with pytest.raises(ShardFailed, match="input row 0 came back 2 times"):
        write_part_results(spec, 2, 4, [parts[0], parts[0], parts[1]])


def test_run_shard_reads_the_committed_input_in_batches(tmp_path):
    _committed_input(tmp_path, ["a dog", "x ray", "a cat", "a cow", "x"], shard=4)
    spec = _spec(tmp_path, batch_rows=2)
    report = run_shard(spec, UpperStage(spec.config), 4)
    assert (report.rows_in, report.rows_out, report.rejects) == (5, 3, {"no_chunks": 2})
    assert pq.read_table(tmp_path / "stages/upper/fp/shard-00004.parquet")["upper"].to_pylist() == [
        "A DOG", "A CAT", "A COW"]
    with pytest.raises(ShardFailed, match=r"stage 'upper' failed on shard 9 .*shard-00009"):
        run_shard(spec, UpperStage(spec.config), 9)  # no committed input


def test_stats_balance_and_funnel():
    with pytest.raises(ValueError, match="rows_in 5 != rows_out 3 \\+ rejects 1"):
        ShardStats(stage="s", shard=0, fingerprint="f", rows_in=5, rows_out=3, rejects={"x": 1})
    docs = {
        "a": [{"stage": "a", "shard": i, "fingerprint": "f", "rows_in": 10, "rows_out": 8,
               "rejects": {"r1": 2}} for i in range(2)],
        "b": [{"stage": "b", "shard": i, "fingerprint": "g", "rows_in": 8, "rows_out": 4,
               "rejects": {"r2": 3, "r1": 1}} for i in range(2)],
    }
    summary = merge(["a", "b"], docs)
    assert summary["stages"]["b"]["rejects"] == {"r1": 2, "r2": 6}
    assert [f["rows_out"] for f in summary["funnel"]] == [16, 8]
    assert summary["funnel"][1]["kept_of_input"] == 0.4


@pytest.mark.parametrize("cluster, asked, expected", [
    # (pool, CPUs per actor) of each actor stage, then task slots and CPUs per task
    ({"CPU": 2}, {"a": Resources(cpus=1, actor=True), "b": Resources(cpus=1, actor=True)},
     ({"a": (1, 0.5), "b": (1, 0.5)}, 1, 1.0)),
    # a small machine: actors share CPUs down to a quarter each, then the pool shrinks
    ({"CPU": 2}, {"a": Resources(cpus=1, actor=True, pool_size=4)}, ({"a": (4, 0.25)}, 1, 1.0)),
    ({"CPU": 2}, {"a": Resources(cpus=1, actor=True, pool_size=8)}, ({"a": (4, 0.25)}, 1, 1.0)),
    ({"CPU": 1}, {"a": Resources(cpus=1, actor=True)}, ({"a": (1, 0.5)}, 1, 0.5)),  # one-CPU machine
    # two 1-CPU nodes: the actors may sit on different nodes, so a task must fit in half a node
    ({"CPU": 2, "min_node_CPU": 1}, {"a": Resources(cpus=1, actor=True), "b": Resources(cpus=1, actor=True)},
     ({"a": (1, 0.5), "b": (1, 0.5)}, 2, 0.5)),
    ({"CPU": 16, "GPU": 2}, {"d": Resources(cpus=1, gpus=1, actor=True, pool_size=4)}, ({"d": (2, 1.0)}, 14, 1.0)),
    ({"CPU": 128, "GPU": 8, "min_node_CPU": 16}, {"c": Resources(cpus=1, actor=True, pool_size=8),
                                                  "d": Resources(cpus=2, gpus=1, actor=True, pool_size=8)},
     ({"c": (8, 1.0), "d": (8, 2.0)}, 104, 1.0)),
    ({"CPU": 16}, {"t": Resources(cpus=1)}, ({}, 16, 1.0)),  # tasks only
])
def test_actor_pools_leave_room_for_tasks(cluster, asked, expected):
    fit = fit_cluster(asked, cluster, warn=False)
    pools, slots, task_cpus = expected
    assert {n: (p.pool, p.cpus) for n, p in fit.stages.items() if p.pool} == pools
    assert (fit.task_slots, fit.task_cpus) == (slots, task_cpus)
    held = sum(p.pool * p.cpus for p in fit.stages.values())
    assert held + fit.task_cpus <= cluster["CPU"]  # the pools plus one task always fit


def test_a_gpu_stage_on_a_cluster_without_gpus_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs 1 GPU per actor but the Ray cluster has 0"):
        fit_cluster({"detect": Resources(cpus=1, gpus=1, actor=True)}, {"CPU": 8})


def test_the_driver_imports_no_model_library(tmp_path):
    """Planning and the driver's engine modules load without torch, transformers, groundingdino or spaCy
    (they load in the workers that run the stages)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = ("import sys\n"
            "from grit_pipeline.config import load_config\n"
            "from grit_pipeline.engine.plan import build_plan\n"
            "import grit_pipeline.engine.scheduler, grit_pipeline.engine.ray_runtime, grit_pipeline.engine.publish, grit_pipeline.cli\n"
            "build_plan(load_config('configs/demo.yaml'), output_uri=sys.argv[1])\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'transformers', 'groundingdino', 'spacy') "
            "if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_detect_parts_hold_whole_forward_batches_and_the_old_knob_is_named():
    from pydantic import ValidationError

    from stages.detect import DetectStage
    from stages.detectors.config import DetectConfig, DetectExecution

    pixels = DetectStage(DetectConfig(backend="hf", hf_model="m"), DetectExecution()).resources
    assert (pixels.batch_size, pixels.part_rows) == (8, 512)  # a 10k-row shard: 20 parts, 42 Ray calls
    assert pixels.queued_parts == 1  # decoded images per actor: (1 + 1) x 512
    assert DetectStage(DetectConfig(backend="hf"), DetectExecution(batch_size=12)).resources.part_rows == 516
    assert DetectStage(DetectConfig(backend="hf"), DetectExecution(part_rows=100)).resources.part_rows == 100
    replay = DetectStage(DetectConfig(backend="replay"), DetectExecution()).resources
    assert replay.batch_size == replay.part_rows == 512  # no forward passes: one process_batch per part
    assert replay.queued_parts == 8  # parts without pixels: more of them queued
    assert DetectStage(DetectConfig(backend="replay"), DetectExecution(queued_parts=0)).resources.queued_parts == 0
    with pytest.raises(ValidationError, match="queued_batches was replaced by queued_parts"):
        DetectExecution(queued_batches=8)
