"""Engine-level reliability: the bad-input corpus through the real engine on local Ray, fault injection
(worker kills, driver SIGKILL mid-detect, a write that fails), and determinism across parallelism.

Every run reads the same corpus with the same stage configs, so the fingerprints, and every output and
reject Parquet, must be byte-identical to the clean run's whatever happened on the way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import faults
import pyarrow.parquet as pq
import pytest
from corpus import mismatches, outcomes_of
from runs import (
    broken_commits,
    committed,
    data_files,
    fingerprints,
    read_outcome_tables,
    read_stats,
    replay_config,
    run_engine,
    seed_from,
)

from stages.registry import STAGE_ORDER, stage_class

pytestmark = pytest.mark.ray

GOOD_SHARDS = [0, 1, 2]


@pytest.fixture(scope="module")
def ray_ready(ray_local):
    faults.ship_by_value()
    return ray_local


@pytest.fixture(scope="module")
def clean(corpus, ray_ready, tmp_path_factory):
    """The reference run: the corpus, replayed boxes, no faults."""
    out = tmp_path_factory.mktemp("clean") / "run"
    config = replay_config(corpus)
    result = run_engine(corpus, out, config)
    return out, config, result, fingerprints(corpus, out, config)


def assert_same_data(run: Path, reference: Path) -> None:
    got, want = data_files(run), data_files(reference)
    assert sorted(got) == sorted(want)
    differing = [name for name in want if got[name] != want[name]]
    assert differing == [], f"files differ from the clean run: {differing}"


# --- the corpus through the engine ------------------------------------------------------------------------
def test_every_row_ends_where_the_corpus_says(corpus, clean):
    out, _, result, fps = clean
    final, rejects = read_outcome_tables(out, fps)
    expected = {k: v for k, v in corpus.expected("replay").items() if k[0] != corpus.bad_shard}
    assert mismatches(expected, outcomes_of(final, rejects), corpus.rows) == []
    assert result.final_shards == GOOD_SHARDS


def test_wrong_schema_shard_fails_alone_with_an_error_naming_its_file(corpus, clean):
    out, _, result, fps = clean
    assert [(f.stage, f.shard) for f in result.failures] == [("ingest", corpus.bad_shard)]
    message = result.failures[0].message
    assert str(corpus.root / f"{corpus.bad_shard:05d}.parquet") in message
    assert "caption column has type double, expected string" in message
    for stage in STAGE_ORDER:
        assert committed(out, stage, fps[stage]) == GOOD_SHARDS, stage


def test_in_equals_out_plus_rejects_per_stage_and_shard(corpus, clean):
    out, _, _, fps = clean
    source_rows = Counter(r.shard for r in corpus.rows)
    for shard in GOOD_SHARDS:
        rows_in = source_rows[shard]
        for stage in STAGE_ORDER:
            st = read_stats(out, stage, fps[stage], shard)
            folder = out / "stages" / stage / fps[stage]
            output = pq.read_table(folder / f"shard-{shard:05d}.parquet")
            rejects = pq.read_table(folder / f"shard-{shard:05d}.rejects.parquet")
            assert st["rows_in"] == rows_in, (stage, shard)
            assert st["rows_in"] == st["rows_out"] + sum(st["rejects"].values()), (stage, shard)
            assert st["rows_out"] == output.num_rows
            assert st["rejects"] == dict(Counter(rejects["reason"].to_pylist())), (stage, shard)
            rows_in = st["rows_out"]
        final = pq.read_table(out / "grit" / f"shard-{shard:05d}.parquet")
        assert final.num_rows == rows_in


def test_engine_output_equals_the_stages_run_one_by_one(corpus, clean, chunks_stage):
    from stagewise import run_stagewise

    out, _, _, _ = clean
    reference = run_stagewise(corpus.root, replay_path=corpus.detections, decode=False, chunks=chunks_stage)
    for shard in GOOD_SHARDS:
        engine_final = pq.read_table(out / "grit" / f"shard-{shard:05d}.parquet")
        assert engine_final.to_pylist() == reference.shards[shard].outputs["compose"].to_pylist(), shard


@pytest.mark.slow
def test_a_pixel_detector_rejects_every_broken_image(corpus, clean, tmp_path):
    """The same corpus with a (tiny, random) transformers GroundingDINO: images are decoded, so image
    problems become detect rejects; every box scores above 0 and min_score is 0, so the rest is kept."""
    from stages.detectors.tiny import hf_grounding_dino

    source, _, _, _ = clean
    out = tmp_path / "run"
    seed_from(source, out, ["ingest", "chunks"])
    config = replay_config(corpus, detect={
        "backend": "hf", "hf_model": hf_grounding_dino(tmp_path / "gd"), "floor": 0.0, "input_size": 64},
        select={"min_score": 0.0},
        run={"progress": False, "resources": {"chunks": {"batch_size": 4},
                                              "detect": {"batch_size": 4, "device": "cpu", "gpus": 0}}})
    result = run_engine(corpus, out, config)
    assert result.stage("ingest").cached == GOOD_SHARDS and result.stage("chunks").cached == GOOD_SHARDS
    final, rejects = read_outcome_tables(out, fingerprints(corpus, out, config))
    expected = {k: v for k, v in corpus.expected("decode").items() if k[0] != corpus.bad_shard}
    assert mismatches(expected, outcomes_of(final, rejects), corpus.rows) == []


# --- determinism ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_different_parallelism_gives_byte_identical_shards(corpus, clean, tmp_path):
    source, _, _, fps = clean
    config = replay_config(
        corpus,
        run={"progress": False,
             "resources": {"chunks": {"cpus": 0.5, "pool_size": 2, "batch_size": 3},
                           "detect": {"cpus": 0.5, "pool_size": 2, "batch_size": 1}}})
    out = tmp_path / "run"
    assert fingerprints(corpus, out, config) == fps  # execution knobs do not change fingerprints
    result = run_engine(corpus, out, config)
    assert result.final_shards == GOOD_SHARDS
    assert_same_data(out, source)


# --- fault injection --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_workers_killed_during_chunks_and_detect_are_retried(corpus, clean, tmp_path):
    source, config, _, _ = clean
    control = tmp_path / "control"
    control.mkdir()
    killer = faults.Killer(control, ["chunks", "detect"])
    killer.start()
    try:
        result = run_engine(corpus, tmp_path / "run", config, stage_classes={
            name: faults.killable(stage_class(name), control) for name in ("chunks", "detect")})
    finally:
        killer.stop()
    assert sorted(killer.killed) == ["chunks", "detect"]  # both workers died mid-batch...
    assert not any(faults.pid_alive(pid) for pid in killer.killed.values())
    assert [(f.stage, f.shard) for f in result.failures] == [("ingest", corpus.bad_shard)]  # ...and Ray retried
    assert_same_data(tmp_path / "run", source)


@pytest.mark.slow
def test_driver_sigkilled_mid_detect_then_rerun_gives_identical_output(corpus, clean, ray_ready, tmp_path):
    source, config, _, fps = clean
    out, control = tmp_path / "run", tmp_path / "control"
    control.mkdir()
    seed_from(source, out, ["ingest", "chunks"])
    address = ray_ready.get_runtime_context().gcs_address
    killed_config = replay_config(corpus, run={"progress": False, "address": address,
                                               "resources": {"chunks": {"batch_size": 4}, "detect": {"batch_size": 1}}})
    spec = {"input": str(corpus.root), "output": str(out), "config": killed_config, "control": str(control),
            "after_commits": 1, "delay": 0.2}
    driver = subprocess.Popen([sys.executable, str(Path(__file__).with_name("driver.py")), json.dumps(spec)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pid_file = control / "detect.pid"
        faults.wait_for(lambda: pid_file.exists() or driver.poll() is not None, 240, "detect's kill point")
        assert driver.poll() is None, f"driver ended before reaching the kill point:\n{driver.stdout.read()[-3000:]}"
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    actor = int(pid_file.read_text())
    if faults.pid_alive(actor):  # Ray ends a dead driver's actors; don't leave it to chance
        os.kill(actor, signal.SIGKILL)
    done_before = committed(out, "detect", fps["detect"])
    assert 1 <= len(done_before) < len(GOOD_SHARDS)  # killed with detect part-way
    assert not (out / "grit").exists()

    result = run_engine(corpus, out, config)
    assert result.stage("detect").cached == done_before
    assert result.stage("detect").computed == [s for s in GOOD_SHARDS if s not in done_before]
    assert broken_commits(out) == []
    assert_same_data(out, source)


@pytest.mark.slow
def test_a_write_that_fails_leaves_no_committed_shard_corrupt(corpus, clean, tmp_path):
    source, config, _, fps = clean
    out = tmp_path / "run"
    seed_from(source, out, ["ingest", "chunks", "detect"])
    target = f"/stages/select/{fps['select']}/shard-00001.parquet"
    full = {**config, "run": {**config["run"], "storage_options": {"target": target}}}
    result = run_engine(corpus, out, full, output_uri=f"fulldisk://{out}")  # workers write through it too

    failed = {(f.stage, f.shard): f.message for f in result.failures}
    assert "No space left on device" in failed[("select", 1)] and "shard-00001.parquet" in failed[("select", 1)]
    assert 1 not in committed(out, "select", fps["select"]) and 1 not in committed(out, "compose", fps["compose"])
    assert (out / target.lstrip("/")).stat().st_size > 0  # the half-written file is there, uncommitted
    assert broken_commits(out) == []
    assert 1 not in result.final_shards

    rerun = run_engine(corpus, out, config)
    assert str(out) + target in rerun.stage("select").cleaned
    assert [(f.stage, f.shard) for f in rerun.failures] == [("ingest", corpus.bad_shard)]
    assert_same_data(out, source)


def test_a_file_where_the_final_folder_must_go_fails_clearly(corpus, clean, tmp_path):
    source, config, _, _ = clean
    out = tmp_path / "run"
    seed_from(source, out, list(STAGE_ORDER))
    (out / "grit").write_text("not a folder")
    with pytest.raises(OSError, match="grit"):
        run_engine(corpus, out, config)
    assert broken_commits(out) == []


# --- the driver dying in the middle of its bookkeeping ------------------------------------------------------
CRASH_POINTS = {  # what is being written when the driver dies, and at which matching write
    "a batch of markers": ("/_done/shard-", 4),
    "a ledger segment": ("/_ledger/seg-", 3),
    "a ledger summary (a segment sealed and folded)": ("/stages/ingest/*/_ledger/summary.json", 2),
    "progress.json": ("progress.json", 3),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_driver_killed_during_bookkeeping_then_rerun_agrees_with_the_markers(corpus, clean, ray_ready, tmp_path,
                                                                            point):
    """The driver is SIGKILLed while it writes a marker batch, a ledger segment, a ledger summary or
    progress.json; the re-run gives byte-identical data, and the ledgers `grit status` reads agree with
    the `_done` markers."""
    from grit_pipeline.commands.status import run_status
    from grit_pipeline.rundir.ledger import ledger_folder, read_ledger
    from grit_pipeline.rundir.store import RunDir

    source, config, _, fps = clean
    out = tmp_path / "run"
    address = ray_ready.get_runtime_context().gcs_address
    crash_config = replay_config(corpus, run={"progress": False, "address": address})
    text, n = CRASH_POINTS[point]
    spec = {"input": str(corpus.root), "output": str(out), "config": crash_config, "segment_records": 2}
    driver = subprocess.run([sys.executable, str(Path(__file__).with_name("crash_driver.py")), json.dumps(spec)],
                            env={**os.environ, "GRIT_TEST_CRASH": f"{text}:{n}"}, capture_output=True, text=True,
                            timeout=600)
    assert driver.returncode == -signal.SIGKILL, driver.stdout[-2000:] + driver.stderr[-3000:]
    assert not (out / "grit").exists() or len(list((out / "grit").glob("shard-*.parquet"))) < len(GOOD_SHARDS)

    result = run_engine(corpus, out, config)
    assert [(f.stage, f.shard) for f in result.failures] == [("ingest", corpus.bad_shard)]
    assert broken_commits(out) == []
    assert_same_data(out, source)
    status = run_status(RunDir(str(out)))
    for s in status["stages"]:
        markers = committed(out, s["stage"], fps[s["stage"]])
        fold, found = read_ledger(RunDir(str(out)), ledger_folder(s["stage"], fps[s["stage"]]))
        assert found and list(fold.committed) == markers, s["stage"]
        assert s["committed"] == len(markers) and s["source"] == "ledger", s
    assert status["final_shards"] == len(GOOD_SHARDS) and status["state"] == "finished"
