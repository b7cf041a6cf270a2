"""`grit status` (`grit_pipeline.commands.status`, `grit_pipeline.commands.status_cli`) on a run directory written file by file
as the engine writes it (RunDir markers and stats, failures.jsonl, a log, a live lease): on a local disk
(with commit times set, for the throughput and ETA), memory:// and S3 (moto)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
import typer
import yaml
from moto_s3 import s3  # noqa: F401 - a fixture
from typer.testing import CliRunner

from grit_pipeline.commands.status import run_status
from grit_pipeline.engine.shard_work import ShardReport
from grit_pipeline.rundir.lease import Lease
from grit_pipeline.rundir.runlog import FailureLog, RunLogHandler
from grit_pipeline.rundir.store import RunDir, json_bytes

REPO = Path(__file__).resolve().parent.parent
FPS = {"ingest": "fa00000000000001", "chunks": "fb00000000000002", "detect": "fc00000000000003"}
PLANNED = list(range(10))
COMMITTED = {"ingest": list(range(8)), "chunks": list(range(6)), "detect": [0, 1, 2]}
# seconds before now of each commit (local disk only): some inside the 600 s window, some before it
AGO = {"ingest": {s: (1200 if s < 4 else 60) for s in range(8)}, "chunks": {s: 30 for s in range(6)},
       "detect": {0: 900, 1: 100, 2: 100}}
HOSTILE = "stage blew up \x1b[2J\u202e on row"


def rows_in(stage: str, shard: int) -> int:
    return 100 + 10 * shard + len(stage)


def rows_out(stage: str, shard: int) -> int:
    return rows_in(stage, shard) - shard


def write_run(rundir: RunDir, ago: dict | None = None, planned: bool = True) -> None:
    """A run of three stages over shards 0-9, partly committed, with failures, final shards and a log."""
    doc = {"fingerprints": FPS, "layout": 2, **({"planned_shards": PLANNED} if planned else {})}
    rundir.write_text("run.yaml", yaml.safe_dump(doc, sort_keys=False))
    for stage, shards in COMMITTED.items():
        fp = FPS[stage]
        for shard in shards:
            files = rundir.write_shard_files(stage, fp, shard, {
                "stats.json": json_bytes({"stage": stage, "shard": shard, "rows_in": rows_in(stage, shard),
                                          "rows_out": rows_out(stage, shard), "seconds": 1.5})})
            report = ShardReport(stage=stage, shard=shard, fingerprint=fp, rows_in=rows_in(stage, shard),
                                 rows_out=rows_out(stage, shard), rejects={"bad": shard}, files=files,
                                 seconds=1.5, peak_rss_mb=10.0)
            rundir.write_marker(stage, fp, shard, report.marker())
    started = datetime(2031, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    failures = FailureLog(rundir, started)
    failures.record(stage="chunks", shard=2, fingerprint=FPS["chunks"], message="transient, committed since")
    failures.record(stage="detect", shard=4, fingerprint="0ld0000000000000", message="under an older config")
    failures.record(stage="chunks", shard=6, fingerprint=FPS["chunks"], key="k6", error_type="RuntimeError",
                    message=HOSTILE)
    for shard in (0, 1):
        rundir.put_atomic(rundir.final_path(shard), b"PAR1")
    handler = RunLogHandler(rundir, started)
    handler.emit(logging.makeLogRecord({"msg": "run started", "levelno": logging.INFO, "levelname": "INFO"}))
    handler.close()
    if ago is not None:  # back-date the commits (the markers' modification times) on a local disk
        now = time.time()
        os.utime(rundir.path("run.yaml"), (now - 3600, now - 3600))
        for stage, shards in ago.items():
            for shard, seconds in shards.items():
                os.utime(rundir.marker_path(stage, FPS[stage], shard), (now - seconds, now - seconds))


def expected_counts() -> dict[str, dict[str, int]]:
    failed = {"ingest": set(), "chunks": {6}, "detect": set()}
    out, blocked = {}, set()
    for stage, shards in COMMITTED.items():
        out[stage] = {"committed": len(shards), "failed": len(failed[stage]),
                      "pending": len(set(PLANNED) - set(shards) - failed[stage] - blocked),
                      "rows_in": sum(rows_in(stage, s) for s in shards),
                      "rows_out": sum(rows_out(stage, s) for s in shards)}
        blocked |= failed[stage]
    return out


def _check_counts(status: dict) -> None:
    assert [s["stage"] for s in status["stages"]] == list(FPS)
    for s in status["stages"]:
        assert {k: s[k] for k in ("committed", "failed", "pending", "rows_in", "rows_out")} == expected_counts()[s["stage"]]
    assert status["stages"][1]["failed_shards"] == [6]
    assert status["planned_shards"] == 10 and status["final_shards"] == 2 and status["failures"] == 3
    assert status["latest_failures"][-1]["message"] == HOSTILE and status["latest_failures"][-1]["key"] == "k6"
    assert len(status["logs"]) == 1 and status["logs"][0].endswith("/logs/20310102T030405Z.log")


def test_status_of_a_local_run_with_throughput_eta_and_a_live_lease(tmp_path):
    rundir = RunDir(str(tmp_path / "run"))
    write_run(rundir, AGO)
    assert run_status(rundir)["lease"] is None
    with Lease.acquire(rundir, stale_after_s=600, command="grit run -o run"):
        status = run_status(rundir, window_s=600)
    _check_counts(status)
    lease = status["lease"]
    assert lease["live"] and lease["pid"] == os.getpid() and lease["command"] == "grit run -o run"
    assert 0 <= lease["age_s"] < 600 and "token" not in lease

    assert status["window_s"] == 600  # the run started an hour ago: the whole window counts
    counts = expected_counts()
    for s in status["stages"]:
        recent = [sh for sh, ago in AGO[s["stage"]].items() if ago < 600]
        assert s["recent_shards"] == len(recent)
        assert s["shards_per_min"] == pytest.approx(len(recent) / 10)
        assert s["rows_per_min"] == pytest.approx(sum(rows_in(s["stage"], sh) for sh in recent) / 10)
        assert s["eta_s"] == pytest.approx(counts[s["stage"]]["pending"] / (len(recent) / 10) * 60)
    assert status["eta_s"] == max(s["eta_s"] for s in status["stages"])  # the slowest stage decides


def test_throughput_of_a_run_younger_than_the_window(tmp_path):
    rundir = RunDir(str(tmp_path / "run"))
    write_run(rundir, {"ingest": {s: 30 for s in range(8)}})
    now = time.time()
    os.utime(rundir.path("run.yaml"), (now - 120, now - 120))
    ingest = run_status(rundir, window_s=600)["stages"][0]
    assert 110 < ingest["recent_shards"] / ingest["shards_per_min"] * 60 < 200  # per the 2 minutes it ran


def test_without_a_planned_shard_list_pending_and_eta_are_unknown(tmp_path):
    """A run.yaml without `shards:` (written before the engine recorded them)."""
    rundir = RunDir(str(tmp_path / "run"))
    write_run(rundir, AGO, planned=False)
    status = run_status(rundir)
    assert status["planned_shards"] is None and status["eta_s"] is None
    assert all(s["pending"] is None and s["eta_s"] is None for s in status["stages"])
    assert [s["committed"] for s in status["stages"]] == [len(v) for v in COMMITTED.values()]
    text = CliRunner().invoke(_app(), ["status", str(tmp_path / "run")])
    assert text.exit_code == 0 and "final shards published: 2\n" in text.stdout


@pytest.mark.parametrize("kind", ["memory", "s3"])
def test_status_on_object_stores(kind, request):
    if kind == "s3":
        server = request.getfixturevalue("s3")
        rundir = RunDir(f"s3://{server.new_bucket()}/run", server.storage_options)
    else:
        rundir = RunDir(f"memory://status-{uuid.uuid4().hex}/run")
    write_run(rundir)
    with Lease.acquire(rundir, stale_after_s=600, command="grit run -o s3"):
        status = run_status(rundir)
    _check_counts(status)
    assert status["lease"]["live"] and status["lease"]["clock"] == "store"
    assert all(s["recent_shards"] == s["committed"] for s in status["stages"])  # everything committed just now
    assert status["eta_s"] is not None and status["eta_s"] > 0


def _app() -> typer.Typer:
    """The real `grit` app: its error handling (one `error:` line, exit 2) lives in `grit_pipeline.cli`."""
    from grit_pipeline.cli import app

    return app


def test_grit_status_cli_json_text_and_errors(tmp_path):
    rundir = RunDir(str(tmp_path / "run"))
    write_run(rundir, AGO)
    runner = CliRunner()
    with Lease.acquire(rundir, stale_after_s=600, command="grit run \x1b]0;title\x07"):
        result = runner.invoke(_app(), ["status", str(tmp_path / "run"), "--json"])
        assert result.exit_code == 0, result.output
        status = json.loads(result.stdout)
        _check_counts(status)
        assert status["lease"]["live"]

        text = runner.invoke(_app(), ["status", str(tmp_path / "run")])
    assert text.exit_code == 0, text.output
    out = text.stdout
    assert "lease: held by host" in out and f"pid {os.getpid()}" in out
    assert "\x1b" not in out and "\u202e" not in out and "\\x1b]0;title\\x07" in out
    assert "3 shard failure(s) recorded" in out and "stage blew up \\x1b[2J\\u202e on row" in out
    for stage in FPS:
        assert stage in out

    missing = runner.invoke(_app(), ["status", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "not a run directory" in missing.output


@pytest.mark.timeout(300)  # reads lines from a process that runs until stopped
def test_grit_status_watch_json_prints_a_line_per_refresh(tmp_path):
    rundir = RunDir(str(tmp_path / "run"))
    write_run(rundir)
    code = ("import typer, sys; from grit_pipeline.commands.status_cli import register; app = typer.Typer(); register(app); "
            "app.callback()(lambda: None); app()")
    proc = subprocess.Popen([sys.executable, "-c", code, "status", str(tmp_path / "run"), "--json", "--watch", "0.5"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        first = json.loads(proc.stdout.readline())
        FailureLog(rundir, datetime.now(timezone.utc)).record(stage="detect", shard=9, message="new failure")
        while True:  # a later refresh sees the new failure
            later = json.loads(proc.stdout.readline())
            if later["failures"] == 4:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert first["failures"] == 3 and later["stages"][2]["failed_shards"] == [9]
