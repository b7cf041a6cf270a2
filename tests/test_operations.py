"""Operating a long run, end to end through `grit`: one writer per run directory (a second `grit run` is
refused naming the holder; a stale lease is taken over), a clean stop on SIGTERM (exit 143, committed
shards intact, a re-run byte-identical to an uninterrupted run), `grit status` from another process, and
failures recorded in `failures.jsonl`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from grit_pipeline.api import run_pipeline
from grit_pipeline.assets.synthetic import replay_overrides, write_img2dataset
from grit_pipeline.rundir.lease import Lease, read_lease
from grit_pipeline.rundir.runlog import read_failures
from grit_pipeline.rundir.store import RunDir

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def six_shards(tmp_path_factory):
    return write_img2dataset(tmp_path_factory.mktemp("ops") / "input", shards=6, rows_per_shard=20)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _grit(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grit_pipeline.cli", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _status(run: Path) -> dict:
    done = _grit("status", str(run), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended early ({proc.returncode}) while waiting for {what}"
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _committed_files(run: Path) -> dict[str, bytes]:
    out = {}
    for marker in run.glob("stages/*/*/_done/shard-*"):
        folder = marker.parent.parent
        for f in [marker, *folder.glob(f"{marker.name}.*parquet")]:
            out[str(f.relative_to(run))] = f.read_bytes()
    return out


def test_a_run_is_leased_watched_stopped_and_resumed(ray_local, six_shards, tmp_path):
    run = tmp_path / "run"
    args = ["run", "--input", str(six_shards.root), "--output", str(run), "--num-cpus", "2", "--no-progress",
            *replay_overrides(six_shards.detections), "run.resources.detect.batch_size=2", "run.stop_grace_s=5"]
    proc = subprocess.Popen([sys.executable, str(HERE / "slow_cli.py"), "1.0", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(lambda: list(run.glob("stages/detect/*/_done/shard-*")), 300, "a detect commit", proc)

        # from another process: some shards committed, not all, and a live lease held by the run. Status
        # reads the ledgers, which the run's bookkeeping writes just after the markers: poll until the
        # first detect commit shows there.
        def detect_status():
            status = _status(run)
            detect = next(s for s in status["stages"] if s["stage"] == "detect")
            return (status, detect) if detect["committed"] > 0 else None

        status, detect = _wait_for(detect_status, 120, "a detect commit in grit status", proc)
        assert status["lease"]["live"] and status["lease"]["pid"] == proc.pid
        assert detect["committed"] < 6 and detect["pending"] > 0

        # a second run on the same directory is refused at once, naming the holder
        second = _grit("run", "--input", str(six_shards.root), "--output", str(run), "--no-progress",
                       *replay_overrides(six_shards.detections))
        assert second.returncode == 2
        assert str(proc.pid) in second.stderr and socket.gethostname() in second.stderr
        assert "heartbeat" in second.stderr

        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM" in out and "resume with" in out and f"--output {run}" in out
    assert read_lease(RunDir(str(run))) is None  # released
    at_stop = _committed_files(run)
    assert any("/detect/" in k for k in at_stop)
    assert len(list(run.glob("stages/compose/*/_done/shard-*"))) < 6  # stopped before the end

    # the re-run finishes the job, leaving the committed files as they were
    result = run_pipeline(None, input=str(six_shards.root), output=str(run),
                          overrides=[*replay_overrides(six_shards.detections), "run.progress=false"])
    assert result.ok, result.failures
    after = _committed_files(run)
    assert all(after[k] == v for k, v in at_stop.items())
    straight = run_pipeline(None, input=str(six_shards.root), output=str(tmp_path / "straight"),
                            overrides=[*replay_overrides(six_shards.detections), "run.progress=false"])
    assert straight.ok
    for final in sorted((tmp_path / "straight" / "grit").glob("shard-*.parquet")):
        assert (run / "grit" / final.name).read_bytes() == final.read_bytes()
    status = _status(run)
    assert status["lease"] is None and all(s["committed"] == 6 and s["pending"] == 0 for s in status["stages"])
    assert list((run / "logs").glob("*.log"))  # each run wrote its log


def test_a_stale_lease_is_taken_over(ray_local, six_shards, tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    Lease.acquire(RunDir(str(run)), stale_after_s=600, command="grit run (crashed long ago)")
    hour_ago = time.time() - 3600
    os.utime(run / "lease.json", (hour_ago, hour_ago))
    result = run_pipeline(None, input=str(six_shards.root), output=str(run), shards="0",
                          overrides=[*replay_overrides(six_shards.detections), "run.progress=false",
                                     "run.lease_stale_s=60"])
    assert result.ok and result.final_shards == [0]
    assert "crashed long ago" in caplog.text and read_lease(RunDir(str(run))) is None


def test_a_source_failure_is_recorded_with_stage_shard_and_file(ray_local, six_shards, tmp_path):
    """Shard 2's tar is empty: ingest cannot list its images and fails the shard (no key to blame)."""
    import shutil

    src = tmp_path / "input"
    shutil.copytree(six_shards.root, src)
    (src / "00002.tar").write_bytes(b"")  # an empty tar: ingest cannot list it
    run = tmp_path / "run"
    result = run_pipeline(None, input=str(src), output=str(run),
                          overrides=[*replay_overrides(six_shards.detections), "run.progress=false"])
    assert [(f.stage, f.shard) for f in result.failures] == [("ingest", 2)]
    [entry] = read_failures(RunDir(str(run)))
    assert (entry["stage"], entry["shard"]) == ("ingest", 2)
    assert entry["input_file"].endswith("00002.parquet") and entry["error_type"]
    assert "00002.tar" in entry["message"] and entry["traceback"]
    assert pq.read_table(run / "grit" / "shard-00003.parquet").num_rows > 0  # the neighbours went on
