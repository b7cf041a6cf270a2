"""The engine on local Ray with the real stages (replay detector): the final shards, validation,
per-stage accounting, determinism, regeneration with a new threshold, and resume after SIGKILL.
Engine mechanics that need a misbehaving stage use small fake stages at the end of this file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from grit_pipeline.api import run_pipeline
from grit_pipeline.commands.validate import validate_run
from grit_pipeline.config import load_config
from grit_pipeline.engine.plan import build_plan, config_for
from grit_pipeline.engine.runner import execute
from grit_pipeline.engine.scheduler import SMALL_PARTS
from grit_pipeline.engine.stage_io import join_upstream
from grit_pipeline.rundir.store import RunDir
from schemas.tables import REJECT_SCHEMA
from stages.base import PreparedExecution, Stage, StageConfig, StageResult
from stages.registry import STAGE_ORDER, stage_class

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parent.parent


def final_bytes(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "grit").glob("shard-*.parquet"))}


def committed_files(run: Path, stages=STAGE_ORDER) -> dict[str, tuple[int, bytes]]:
    """Every file of a committed shard (its `_done` marker exists): relative path -> (mtime, bytes)."""
    out = {}
    for stage in stages:
        for fp_dir in (run / "stages" / stage).glob("*"):
            for marker in (fp_dir / "_done").glob("shard-*"):
                for f in [marker, *fp_dir.glob(f"{marker.name}.*")]:
                    out[str(f.relative_to(run))] = (f.stat().st_mtime_ns, f.read_bytes())
    return out


def stage_dir(run: Path, stage: str) -> Path:
    fps = yaml_fingerprints(run)
    return run / "stages" / stage / fps[stage]


def yaml_fingerprints(run: Path) -> dict[str, str]:
    import yaml

    return yaml.safe_load((run / "run.yaml").read_text())["fingerprints"]


def reference_final(root: Path, overrides: list[str]) -> dict[int, pa.Table]:
    """The stages called one after another in this process, a whole shard per call: what the engine's
    streamed, batched, reassembled run must reproduce exactly."""
    cfg = load_config(None, overrides)
    stages = [stage_class(n)(getattr(cfg, n)) for n in STAGE_ORDER]
    for s in stages:
        s.setup()
    out = {}
    for src in stages[0].discover(str(root)):
        tables = [stages[0].process_batch(stages[0].read(src)).output]
        if tables[0].num_rows == 0:
            continue  # nothing for the later stages (the engine does not call them either)
        for i, stage in enumerate(stages[1:], start=1):
            inp = join_upstream(list(STAGE_ORDER[:i]), tables)
            inp = stage.prepare_batch(inp).output
            tables.append(stage.process_batch(inp).output)
        out[src.index] = tables[-1]
    return out


def test_run_gives_valid_final_shards_equal_to_the_stages_run_in_process(pipeline_run, synthetic_input,
                                                                         replay_overrides):
    result, run = pipeline_run
    assert result.ok, result.failures
    assert result.final_shards == [0, 1, 2, 3]
    assert [s.computed for s in result.stages] == [[0, 1, 2, 3]] * 5
    report = validate_run(str(run))
    assert report.ok, report.problems[:5]
    expected = reference_final(synthetic_input.root, replay_overrides)
    assert sorted(expected) == [0, 1, 2]
    for shard, table in expected.items():
        got = pq.read_table(run / "grit" / f"shard-{shard:05d}.parquet")
        assert got.num_rows > 0
        assert got.equals(table), f"shard {shard} differs from the in-process stages"
        assert got.column_names[-1] == "clip_similarity_vitb32"  # source passthrough column kept
    empty = pq.read_table(run / "grit" / "shard-00003.parquet")  # every download of shard 3 failed
    assert empty.num_rows == 0 and empty.schema.equals(expected[0].schema)
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert summary["stages"]["ingest"]["rows_in"] == synthetic_input.rows
    assert summary["stages"]["ingest"]["rejects"] == {"download_failed": 3 + 5, "duplicate_key": 3,
                                                      "empty_caption": 3}


def test_every_stage_shard_balances_and_holds_only_key_and_its_columns(pipeline_run):
    _, run = pipeline_run
    previous_out = None
    for stage in STAGE_ORDER:
        d = stage_dir(run, stage)
        schema = stage_class(stage).output_schema
        for shard in range(4):
            stats = json.loads((d / f"shard-{shard:05d}.stats.json").read_text())
            out = pq.read_table(d / f"shard-{shard:05d}.parquet")
            rej = pq.read_table(d / f"shard-{shard:05d}.rejects.parquet")
            assert rej.schema.equals(REJECT_SCHEMA)
            assert stats["rows_out"] == out.num_rows
            assert sum(stats["rejects"].values()) == rej.num_rows
            assert stats["rows_in"] == stats["rows_out"] + rej.num_rows
            if previous_out is not None:
                assert stats["rows_in"] == previous_out[shard]
            assert set(rej["stage"].to_pylist()) <= {stage}
            assert out.column_names[: len(schema)] == schema.names
            extra = out.column_names[len(schema):]
            assert extra == ([] if stage not in ("ingest", "compose") else ["clip_similarity_vitb32"])
            # no key twice; after ingest (where a duplicate source key is rejected) none in both files
            keys = out["key"].to_pylist() + (rej["key"].to_pylist() if stage != "ingest" else [])
            assert len(keys) == len(set(keys))
        previous_out = {s: pq.read_metadata(d / f"shard-{s:05d}.parquet").num_rows for s in range(4)}
    assert previous_out[3] == 0


def test_two_runs_with_other_batching_are_byte_identical(pipeline_run, synthetic_input, replay_overrides,
                                                         tmp_path):
    _, run = pipeline_run
    other = tmp_path / "again"
    result = run_pipeline(None, input=str(synthetic_input.root), output=str(other), overrides=[
        *replay_overrides, "run.resources.chunks.batch_size=13", "run.resources.detect.batch_size=3"])
    assert result.ok
    assert final_bytes(other) == final_bytes(run)
    ours = {k: v[1] for k, v in committed_files(run).items() if not k.endswith(".stats.json")}
    theirs = {k: v[1] for k, v in committed_files(other).items() if not k.endswith(".stats.json")}
    assert ours == theirs  # every stage file and marker, not only the final shards


def test_new_select_threshold_reruns_select_and_compose_only(pipeline_run, synthetic_input, replay_overrides,
                                                             tmp_path):
    _, base = pipeline_run
    run = tmp_path / "rethreshold"
    shutil.copytree(base, run)  # copy2: mtimes kept
    upstream = committed_files(run, ("ingest", "chunks", "detect"))
    old = {s: pq.read_table(run / "grit" / f"shard-{s:05d}.parquet") for s in range(4)}

    result = run_pipeline(None, input=str(synthetic_input.root), output=str(run),
                          overrides=[*replay_overrides, "select.min_score=0.8"])
    assert result.ok
    for stage in ("ingest", "chunks", "detect"):
        assert result.stage(stage).cached == [0, 1, 2, 3] and result.stage(stage).computed == []
    for stage in ("select", "compose"):
        assert result.stage(stage).computed == [0, 1, 2, 3]
    assert committed_files(run, ("ingest", "chunks", "detect")) == upstream  # same bytes, same mtimes
    assert validate_run(str(run)).ok

    threshold = np.float32(0.8)  # select compares float32 scores, as they are stored
    for shard in range(4):
        new = pq.read_table(run / "grit" / f"shard-{shard:05d}.parquet")
        kept = {}
        for row in old[shard].to_pylist():
            entries = [(c, r) for c, r in zip(row["noun_chunks"], row["ref_exps"], strict=True) if np.float32(c[6]) > threshold]
            if entries:
                kept[row["key"]] = entries
        assert new["key"].to_pylist() == list(kept)
        for row in new.to_pylist():
            assert list(zip(row["noun_chunks"], row["ref_exps"], strict=True)) == kept[row["key"]]
    assert sum(t.num_rows for t in old.values()) > sum(len(pq.read_table(p)) for p in (run / "grit").glob("*.parquet"))


@pytest.mark.slow
def test_sigkill_of_the_driver_then_rerun_resumes(pipeline_run, synthetic_input, replay_overrides, small_batches,
                                                  tmp_path):
    _, baseline = pipeline_run
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "grit_pipeline.cli", "run", "--input", str(synthetic_input.root),
           "--output", str(run), "--num-cpus", "2", "--no-progress", *replay_overrides, *small_batches]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not list(run.glob("stages/chunks/*/_done/shard-*")):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no chunks shard committed in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        _kill_group(proc)
    at_kill = committed_files(run)
    assert any("/chunks/" in k for k in at_kill)
    assert not list(run.glob("grit/shard-*.parquet"))  # killed before the end

    result = run_pipeline(None, input=str(synthetic_input.root), output=str(run), overrides=replay_overrides)
    assert result.ok, result.failures
    after = committed_files(run)
    for path, (mtime, data) in at_kill.items():
        assert after[path] == (mtime, data), f"{path} was recomputed"
    for stage in STAGE_ORDER:
        done_before = {int(k.rsplit("-", 1)[1]) for k in at_kill if f"/{stage}/" in k and "/_done/" in k}
        assert set(result.stage(stage).cached) == done_before
        assert set(result.stage(stage).computed) == {0, 1, 2, 3} - done_before
    assert not (run / "_tmp").exists()
    assert final_bytes(run) == final_bytes(baseline)
    keys = pa.concat_tables([pq.read_table(p) for p in sorted((run / "grit").glob("*.parquet"))])["key"]
    base_keys = pa.concat_tables([pq.read_table(p) for p in sorted((baseline / "grit").glob("*.parquet"))])["key"]
    assert len(keys) == len(pc.unique(keys)) and sorted(keys.to_pylist()) == sorted(base_keys.to_pylist())



def test_transient_read_errors_are_retried_and_the_shard_succeeds(pipeline_run, synthetic_input,
                                                                   replay_overrides, tmp_path):
    """Reads through `flaky://` fail once where the rules say (the source metadata of shard 1, then the
    chunks output of shard 2 when detect reads it); the run retries them and ends as a clean run does."""
    import testfs

    _, baseline = pipeline_run
    source_hits = testfs.add_flaky_rule("source-1", "/00001.parquet", failures=1)
    upstream_hits = testfs.add_flaky_rule("chunks-2", "/stages/chunks/", failures=1)
    result = run_pipeline(None, input=f"flaky://{synthetic_input.root}", output=f"flaky://{tmp_path}/run",
                          overrides=replay_overrides)
    assert result.ok, result.failures
    assert len(source_hits.read_text().splitlines()) == 1 and len(upstream_hits.read_text().splitlines()) == 1
    for name in final_bytes(baseline):
        assert pq.read_table(tmp_path / "run" / "grit" / name).equals(pq.read_table(baseline / "grit" / name))


def test_a_persistent_read_error_fails_the_shard_naming_stage_and_file(pipeline_run, synthetic_input,
                                                                       replay_overrides, tmp_path):
    import testfs

    testfs.add_flaky_rule("source-2-always", "/00002.parquet", failures=50)
    result = run_pipeline(None, input=f"flaky://{synthetic_input.root}", output=str(tmp_path / "run"),
                          overrides=replay_overrides)
    [failure] = result.failures
    assert (failure.stage, failure.shard) == ("ingest", 2)
    assert "00002.parquet" in failure.message and "ConnectionResetError" in failure.message
    assert "after 4 tries" in failure.message
    assert result.final_shards == [0, 1, 3]


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop what is left of the process group we started (Ray's helpers die with the driver anyway)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


# --- engine mechanics with small fake stages -------------------------------------------------------------
class FakeSource(StageConfig):
    pass


@dataclass(frozen=True)
class FakeShard:
    index: int
    uri: str


class FakeIngest(Stage[FakeSource]):
    """Source stage over a folder of `NNNNN.txt` files, one caption per line."""

    name = "src"
    version = 1
    Config = FakeSource
    output_schema = pa.schema([pa.field("key", pa.string(), nullable=False), pa.field("caption", pa.string())])

    def discover(self, uri: str):
        return [FakeShard(index=int(p.stem), uri=str(p)) for p in sorted(Path(uri).glob("*.txt"))]

    def read(self, shard) -> pa.Table:
        lines = Path(shard.uri).read_text().splitlines()
        return pa.table({"key": [f"{shard.index}-{i}" for i in range(len(lines))], "caption": lines})

    def process_batch(self, table: pa.Table) -> StageResult:
        return StageResult(table, REJECT_SCHEMA.empty_table())


class PidsConfig(StageConfig):
    pass


class PidsExecution(PreparedExecution):
    batch_size: int = 2
    fault_file: str = ""  # while this file exists, a caption equal to its content makes the stage raise
    trace_dir: str = ""  # when set: each part's prepare start and process end times are written here
    process_s: float = 0.0  # seconds process_batch sleeps (a slow GPU)
    part_rows: int | None = None  # rows per part, as detect's; None: batch_size


class PidsStage(Stage[PidsConfig]):
    """Actor stage with a prepare step; records which processes prepared and processed each row."""

    name = "pids"
    version = 1
    Config = PidsConfig
    Execution = PidsExecution
    output_schema = pa.schema([pa.field("key", pa.string(), nullable=False), pa.field("prep_pid", pa.int64()),
                               pa.field("proc_pid", pa.int64()), pa.field("setups", pa.int64())])
    setups = 0

    @property
    def resources(self):
        return super().resources.model_copy(update={"part_rows": self.execution.part_rows})

    def setup(self) -> None:
        PidsStage.setups += 1

    def _trace(self, table: pa.Table, event: str) -> None:
        if self.execution.trace_dir and table.num_rows:
            (Path(self.execution.trace_dir) / f"{table['key'][0].as_py()}.{event}").write_text(
                f"{time.time()!r} {table.num_rows}")

    def prepare_batch(self, table: pa.Table) -> StageResult:
        self._trace(table, "prepared")
        return StageResult(table.append_column("prep_pid", pa.array([os.getpid()] * table.num_rows, pa.int64())),
                           REJECT_SCHEMA.empty_table())

    def process_batch(self, table: pa.Table) -> StageResult:
        time.sleep(self.execution.process_s)
        self._trace(table, "processed")
        fault = Path(self.execution.fault_file)
        if self.execution.fault_file and fault.exists() and fault.read_text() in table["caption"].to_pylist():
            raise ValueError("injected fault")
        n = table.num_rows
        return StageResult(pa.table({"key": table["key"], "prep_pid": table["prep_pid"],
                                     "proc_pid": pa.array([os.getpid()] * n, pa.int64()),
                                     "setups": pa.array([PidsStage.setups] * n, pa.int64())}),
                           REJECT_SCHEMA.empty_table())


FAKE_STAGES = {"src": FakeIngest, "pids": PidsStage}


@pytest.fixture
def fake_input(tmp_path, ray_local):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    folder = tmp_path / "src"
    folder.mkdir()
    for shard in range(3):
        (folder / f"{shard:05d}.txt").write_text("\n".join(f"caption {shard}.{i}" for i in range(5)))
    (folder / "00003.txt").write_text("")  # an empty shard: later stages get no rows
    return folder


def _fake_config(**pids):
    return config_for(FAKE_STAGES, run={"progress": False, "resources": {"pids": pids}})


def test_prepare_runs_in_cpu_tasks_ahead_of_an_actor_set_up_once(fake_input, tmp_path):
    plan = build_plan(_fake_config(), input_uri=str(fake_input), output_uri=str(tmp_path / "run"),
                      stage_classes=FAKE_STAGES)
    result = execute(plan)
    assert result.ok and result.final_shards == [0, 1, 2, 3]
    table = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "run" / "grit").glob("*.parquet"))])
    assert table.num_rows == 15
    assert len(set(table["proc_pid"].to_pylist())) == 1  # one actor for all shards
    assert set(table["setups"].to_pylist()) == {1}  # its model loaded once
    assert not set(table["prep_pid"].to_pylist()) & set(table["proc_pid"].to_pylist())  # not fused


@pytest.mark.parametrize("part_rows", [None, 64])
def test_prepared_parts_stay_within_pool_times_one_plus_queued_parts(fake_input, tmp_path, part_rows):
    """With a slow actor, parts are prepared only as far ahead as the bound on prepared data allows: from
    its prepare task starting to its actor call ending, at most (1 + queued_parts) full parts' rows per
    actor. With part_rows 64 the shards' parts are far smaller than that (small shards are cut into parts
    of whole batches): they count as parts too, at most SMALL_PARTS per full part of the bound, so
    decoding does not run shards ahead."""
    trace = tmp_path / "trace"
    trace.mkdir()
    queued = 0 if part_rows else PidsExecution().queued_parts
    extra = {"part_rows": part_rows} if part_rows else {}
    cfg = _fake_config(trace_dir=str(trace), process_s=0.3, queued_parts=queued, **extra)  # parts of 2 rows: 9
    result = execute(build_plan(cfg, input_uri=str(fake_input), output_uri=str(tmp_path / "run"),
                                stage_classes=FAKE_STAGES))
    assert result.ok, result.failures
    spans = [(*map(float, (trace / f"{p.stem}.prepared").read_text().split()), float(p.read_text().split()[0]))
             for p in trace.glob("*.processed")]  # (prepare start, rows, process end) per part
    assert len(spans) == 9
    events = sorted([(a, n) for a, n, _ in spans] + [(b, -n) for _, n, b in spans])
    alive = max(np.cumsum([d for _, d in events]))
    bound = (1 + queued) * (part_rows or PidsExecution().batch_size)  # full parts' rows
    assert alive <= bound, f"{alive:g} rows prepared or processing at once, bound {bound}"
    parts = max(np.cumsum([1 if n > 0 else -1 for _, n in events]))
    most = (1 + queued) * (SMALL_PARTS if part_rows else 1)
    assert parts <= most, f"{parts} parts prepared or processing at once, bound {most}"
    assert result.ray_calls["pids"] == 3 * (1 + 3 + 3 + 1) + 1  # 3 shards of 3 parts; the empty shard: a write


def test_a_failing_shard_is_reported_while_the_others_commit(fake_input, tmp_path):
    fault = tmp_path / "fault"
    fault.write_text("caption 1.3")
    cfg = _fake_config(fault_file=str(fault))
    run = tmp_path / "run"
    result = execute(build_plan(cfg, input_uri=str(fake_input), output_uri=str(run), stage_classes=FAKE_STAGES))
    assert not result.ok
    [failure] = result.failures
    assert (failure.stage, failure.shard) == ("pids", 1)
    assert "stages/src/" in failure.message and "shard-00001.parquet" in failure.message
    assert "at key '1-3'" in failure.message and "injected fault" in failure.message
    assert result.final_shards == [0, 2, 3]
    from grit_pipeline.rundir.runlog import read_failures

    [entry] = read_failures(RunDir(str(run)))  # failures.jsonl: the same facts, as fields
    assert (entry["stage"], entry["shard"], entry["key"], entry["error_type"]) == ("pids", 1, "1-3", "ValueError")
    assert entry["input_file"].endswith("stages/src/" + plan_fp(cfg, fake_input, run, "src") + "/shard-00001.parquet")
    assert "injected fault" in entry["message"] and "Traceback" in entry["traceback"]
    fault.unlink()  # fixed: the re-run computes only the failed shard
    again = execute(build_plan(cfg, input_uri=str(fake_input), output_uri=str(run), stage_classes=FAKE_STAGES))
    assert again.ok and again.final_shards == [0, 1, 2, 3]
    assert again.stage("pids").computed == [1] and again.stage("pids").cached == [0, 2, 3]


def plan_fp(cfg, fake_input, run, stage: str) -> str:
    return build_plan(cfg, input_uri=str(fake_input), output_uri=str(run), stage_classes=FAKE_STAGES,
                      inspect_cache=False).fingerprints[stage]


def test_limit_and_running_stage_ranges(fake_input, tmp_path):
    cfg, run = _fake_config(), tmp_path / "run"

    def go(output, **kw):
        return execute(build_plan(cfg, input_uri=str(fake_input), output_uri=str(output), stage_classes=FAKE_STAGES,
                                  limit=7, **kw))

    first = go(run, to_stage="src")
    assert first.ok and [s.name for s in first.stages] == ["src"]
    assert first.stage("src").computed == [0, 1] and first.final_shards == []  # 5 + 2 rows
    missing = go(tmp_path / "fresh", from_stage="pids")
    assert [f.shard for f in missing.failures] == [0, 1]
    assert "no committed 'src' output" in missing.failures[0].message
    second = go(run, from_stage="pids")
    assert second.ok and [s.name for s in second.stages] == ["pids"] and second.final_shards == [0, 1]
    table = pa.concat_tables([pq.read_table(p) for p in sorted((run / "grit").glob("*.parquet"))])
    assert table["key"].to_pylist() == [f"0-{i}" for i in range(5)] + ["1-0", "1-1"]
