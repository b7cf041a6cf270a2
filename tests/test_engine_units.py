"""Engine mechanics without Ray: joining upstream outputs, the output contract, row accounting, the worker
envelopes (errors name stage, shard file and key), prepare rejects, shard assembly, stats balance."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from grit_pipeline.engine import ShardAssembler
from grit_pipeline.rundir import RunDir
from grit_pipeline.stage_io import StageOutputError, account_rows, conform_output, join_upstream
from grit_pipeline.stats import ShardStats, merge
from grit_pipeline.workers import (
    StageRuntime,
    envelope,
    from_ipc,
    prepare_rows,
    run_rows,
    tag_rows,
)
from schemas.tables import INGEST_SCHEMA
from stages.base import Resources, Stage, StageConfig, StageResult

UPPER_SCHEMA = pa.schema([pa.field("key", pa.string(), nullable=False), pa.field("upper", pa.string())])


class UpperConfig(StageConfig):
    fail_on: str | None = None  # a caption that makes process_batch raise
    lose: str | None = None  # a key process_batch silently drops


class UpperStage(Stage[UpperConfig]):
    """Upper-cases captions; rejects captions starting with 'x'."""

    name = "upper"
    version = 1
    Config = UpperConfig
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


def _rt(tmp_path, **cfg) -> StageRuntime:
    return StageRuntime(name="upper", cls=UpperStage, config=UpperConfig(**cfg), fingerprint="fp",
                        resources=UpperStage().resources, rundir=RunDir(str(tmp_path)),
                        upstream=(("ingest", "fp0"),), has_prepare=True)


def test_join_upstream_keeps_previous_stage_rows_and_order():
    ingest = _ingest(["a", "b", "c"], ["cap a", "cap b", "cap c"], {"clip": [0.1, 0.2, 0.3]})
    prev = pa.table({"key": ["c", "a"], "upper": ["CAP C", "CAP A"]})
    joined = join_upstream(["ingest", "upper"], [ingest, prev])
    assert joined["key"].to_pylist() == ["c", "a"]
    assert joined.column_names == ["key", *INGEST_SCHEMA.names[1:], "clip", "upper"]
    assert joined["clip"].to_pylist() == [0.3, 0.1]
    with pytest.raises(StageOutputError, match="'z'"):
        join_upstream(["ingest", "upper"], [ingest, pa.table({"key": ["z"], "upper": ["Z"]})])


def test_conform_output_enforces_the_stage_contract():
    good = pa.table({"key": ["a"], "upper": ["A"]})
    assert conform_output("upper", good, UPPER_SCHEMA).schema == UPPER_SCHEMA
    with pytest.raises(StageOutputError, match=r"unexpected column\(s\) \['caption'\]"):
        conform_output("upper", good.append_column("caption", pa.array(["a"])), UPPER_SCHEMA)
    with pytest.raises(StageOutputError, match="lacks column"):
        conform_output("upper", good.select(["key"]), UPPER_SCHEMA)
    with pytest.raises(StageOutputError, match="null 'key'"):
        conform_output("upper", pa.table({"key": pa.array([None], pa.string()), "upper": ["A"]}), UPPER_SCHEMA)
    # passthrough columns are allowed where the caller says so, after the schema's fields
    out = conform_output("upper", pa.table({"clip": [0.5], "upper": ["A"], "key": ["a"]}), UPPER_SCHEMA,
                         allowed_extra=["clip"])
    assert out.column_names == ["key", "upper", "clip"]


def test_account_rows_names_the_key_that_breaks_in_equals_out_plus_rejects():
    keys = pa.array(["a", "b", "c"])
    out = pa.table({"key": ["c", "a"]})
    rej = pa.table({"key": ["b"]})
    out_idx, rej_idx = account_rows("s", keys, out, rej)
    assert out_idx.tolist() == [2, 0] and rej_idx.tolist() == [1]
    with pytest.raises(StageOutputError, match="1 input row.*'b'"):
        account_rows("s", keys, out, pa.table({"key": pa.array([], pa.string())}))
    with pytest.raises(StageOutputError, match="'a' more than once"):
        account_rows("s", keys, pa.table({"key": ["a", "c"]}), pa.table({"key": ["a", "b"]}))
    with pytest.raises(StageOutputError, match="'zz' that is not in its input"):
        account_rows("s", keys, pa.table({"key": ["zz"]}), rej)


def _tagged(captions, shard=4):
    keys = [f"k{i}" for i in range(len(captions))]
    return tag_rows(_ingest(keys, captions), shard)


def test_run_rows_reports_outputs_and_rejects_with_their_rows(tmp_path):
    rt = _rt(tmp_path)
    env = run_rows(rt, UpperStage(rt.config), 4, _tagged(["a dog", "x ray", "a cat"]).slice(0, 3))
    assert env["error"] is None and (env["shard"], env["total"], env["rows"]) == (4, 3, 3)
    out, rej = from_ipc(env["output"]), from_ipc(env["rejects"])
    assert out.to_pydict() == {"key": ["k0", "k2"], "upper": ["A DOG", "A CAT"], "__row": [0, 2]}
    assert rej.select(["key", "reason", "__row"]).to_pydict() == {
        "key": ["k1"], "reason": ["no_chunks"], "__row": [1]}


def test_failing_batch_names_stage_shard_file_and_key(tmp_path):
    rt = _rt(tmp_path, fail_on="a cat")
    env = run_rows(rt, UpperStage(rt.config), 4, _tagged(["a dog", "a cat", "a cow"]))
    assert env["output"] is None and env["rows"] == 3
    msg = env["error"]
    assert "stage 'upper' failed on shard 4" in msg
    assert "stages/ingest/fp0/shard-00004.parquet" in msg  # the shard's input file
    assert "at key 'k1'" in msg and "cannot handle 'a cat'" in msg


def test_a_stage_that_loses_a_row_fails_the_shard(tmp_path):
    rt = _rt(tmp_path, lose="k2")
    env = run_rows(rt, UpperStage(rt.config), 4, _tagged(["a", "b", "c"]))
    assert "neither output nor rejected 1 input row(s), first key 'k2'" in env["error"]


def test_prepare_rejects_travel_to_the_process_step(tmp_path):
    rt = _rt(tmp_path)
    batch = pa.concat_tables([_tagged(["a dog", "bad image"], shard=1), _tagged(["bad", "a cow"], shard=2)])
    prepared = prepare_rows(batch, rt)
    assert prepared.num_rows == 4 and prepared["__reason"].null_count == 2
    envs = [run_rows(rt, UpperStage(), s, prepared.filter(pa.compute.equal(prepared["__shard"], s)))
            for s in (1, 2)]
    for env in envs:
        assert env["error"] is None and env["rows"] == 2
    assert from_ipc(envs[0]["rejects"]).select(["key", "stage", "reason", "__row"]).to_pylist() == [
        {"key": "k1", "stage": "upper", "reason": "image_unreadable", "__row": 1}]
    assert from_ipc(envs[1]["output"]).to_pydict() == {"key": ["k1"], "upper": ["A COW"], "__row": [1]}


def _env(shard, total, rows, out_rows, rej_rows=(), error=None):
    out = pa.table({"key": [f"k{r}" for r in out_rows], "__row": pa.array(out_rows, pa.int64())})
    rej = pa.table({"key": [f"k{r}" for r in rej_rows], "__row": pa.array(list(rej_rows), pa.int64())})
    return envelope(shard, total, rows, output=out, rejects=rej, error=error)


def test_assembler_completes_shards_once_and_drops_replayed_rows():
    asm = ShardAssembler("s")
    assert asm.add(_env(0, 4, 2, [0], [1]))[1] is None
    assert asm.add(_env(0, 4, 2, [0], [1]))[1] is None  # a retried call delivers rows 0-1 again
    shard, done, err = asm.add(_env(0, 4, 2, [3], [2]))
    assert shard == 0 and err is None
    assert sorted(np.concatenate([t["__row"].to_numpy() for t in done.outputs]).tolist()) == [0, 3]
    assert sum(t.num_rows for t in done.rejects) == 2
    _, done, err = asm.add(_env(1, 3, 3, [], error="boom"))
    assert done is None and err == "boom"
    assert asm.add(_env(1, 3, 3, [0, 1, 2]))[1] is None  # envelopes of a failed shard are ignored


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
    ({"CPU": 2}, Resources(cpus=1, actor=True, pool_size=1), (1, 1.0, 0.5, 1.0)),
    ({"CPU": 2}, Resources(cpus=1, actor=True, pool_size=4), (1, 1.0, 0.5, 1.0)),  # pool shrinks
    ({"CPU": 1}, Resources(cpus=1, actor=True, pool_size=1), (1, 0.5, 0.5, 0.5)),  # one-CPU machine
    ({"CPU": 16, "GPU": 2}, Resources(cpus=1, gpus=1, actor=True, pool_size=4), (2, 1.0, 0.5, 1.0)),
    ({"CPU": 16}, Resources(cpus=1), (0, 1.0, 0.5, 1.0)),  # tasks
])
def test_actor_pools_leave_room_for_their_loading_tasks(tmp_path, cluster, asked, expected):
    from grit_pipeline.ray_exec import fit_resources

    rt = _rt(tmp_path)
    rt.resources = asked
    fit = fit_resources(rt, cluster, loader_cpus=0.5)
    assert (fit.pool, fit.stage_cpus, fit.loader_cpus, fit.prepare_cpus) == expected
    # what the pool holds plus one loading task always fits
    if asked.actor:
        assert fit.pool * fit.stage_cpus + max(fit.loader_cpus, fit.prepare_cpus) <= cluster["CPU"]


def test_a_gpu_stage_on_a_cluster_without_gpus_is_a_clear_error(tmp_path):
    from grit_pipeline.ray_exec import fit_resources

    rt = _rt(tmp_path)
    rt.resources = Resources(cpus=1, gpus=1, actor=True)
    with pytest.raises(RuntimeError, match="needs 1 GPU per actor but the Ray cluster has 0"):
        fit_resources(rt, {"CPU": 8}, loader_cpus=0.5)
