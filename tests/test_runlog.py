"""The run log and the failure log (`grit_pipeline.rundir.runlog`) on a local disk, memory:// and S3 (moto), and
the report's "Run log" section that links them."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import datetime, timezone

import pytest
from moto_s3 import s3  # noqa: F401 - a fixture

from grit_pipeline.rundir.runlog import (
    FAILURES,
    FailureLog,
    RunLogHandler,
    log_files,
    read_failures,
    run_stamp,
)
from grit_pipeline.rundir.store import RunDir

STARTED = datetime(2031, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
HOSTILE = "caption \x1b[31mred\x1b[0m \u202eevil\nFAKE 2031-01-01 ERROR forged line"


def _logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"grit-test-{uuid.uuid4().hex}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    return logger


@pytest.fixture(params=["local", "memory"])
def rundir(request, tmp_path):
    return RunDir(str(tmp_path / "run") if request.param == "local" else f"memory://runlog-{uuid.uuid4().hex}/run")


def test_log_lines_are_written_escaped_one_record_per_line(rundir):
    handler = RunLogHandler(rundir, STARTED)
    logger = _logger(handler)
    logger.info("shard %d committed: %s", 3, HOSTILE)
    try:
        raise ValueError("bad \x1b row")
    except ValueError:
        logger.exception("shard 4 failed")
    logger.debug("not at INFO")
    handler.close()

    assert log_files(rundir) == [f"logs/{run_stamp(STARTED)}.log"] == ["logs/20310506T070809Z.log"]
    text = rundir.read_bytes(rundir.path(log_files(rundir)[0])).decode()
    assert "\x1b" not in text and "\u202e" not in text
    lines = text.splitlines()
    assert "shard 3 committed: caption \\x1b[31mred\\x1b[0m \\u202eevil\\x0aFAKE" in lines[0]
    assert not any(line.startswith("FAKE") for line in lines)  # the newline in the message forged nothing
    assert "shard 4 failed" in lines[1] and "Traceback (most recent call last):" in lines[2]
    assert "ValueError: bad \\x1b row" in text  # the traceback keeps its line breaks, not its controls
    assert "not at INFO" not in text


def test_object_store_log_is_flushed_periodically_and_in_parts():
    rundir = RunDir(f"memory://runlog-{uuid.uuid4().hex}/run")
    handler = RunLogHandler(rundir, STARTED, flush_every_s=0.05, part_bytes=400)
    logger = _logger(handler)
    logger.info("first line")
    deadline = time.monotonic() + 30
    while not log_files(rundir):  # written by the flush thread, without a flush() call
        assert time.monotonic() < deadline, "the log was never flushed"
        time.sleep(0.02)
    messages = [f"line {i:03d} " + "x" * 40 for i in range(30)]
    for m in messages:
        logger.info(m)
    handler.close()

    files = log_files(rundir)
    assert len(files) > 2 and files[0] == "logs/20310506T070809Z.log" and files[1] == "logs/20310506T070809Z.002.log"
    parts = [rundir.read_bytes(rundir.path(f)).decode() for f in files]
    assert all(len(p.encode()) <= 400 for p in parts)
    got = [line.split(": ", 1)[1] for p in parts for line in p.splitlines()]
    assert got == ["first line", *messages]  # every line once, in order, across the parts


FAILURE = dict(stage="detect", shard=7, fingerprint="f00d", input_file="s3://in/00007.tar", key="000070012",
               error_type="ValueError", message=HOSTILE, traceback="Traceback (most recent call last):\n  ...\n")


@pytest.mark.parametrize("kind", ["local", "memory", "s3"])
def test_failure_log_round_trip_keeps_earlier_runs(kind, tmp_path, request):
    if kind == "s3":
        server = request.getfixturevalue("s3")
        rundir = RunDir(f"s3://{server.new_bucket()}/run", server.storage_options)
    else:
        rundir = RunDir(str(tmp_path / "run") if kind == "local" else f"memory://fail-{uuid.uuid4().hex}/run")
    assert read_failures(rundir) == []
    first = FailureLog(rundir, STARTED).record(**FAILURE)
    assert read_failures(rundir) == [first]  # durable when record returns
    later = datetime(2031, 5, 7, tzinfo=timezone.utc)
    log = FailureLog(rundir, later)  # the next run: appends
    second = log.record(stage="compose", shard=2, message="no key", error_type="KeyError")
    third = log.record(stage="publish", shard=3, message="ünïcode ✓")
    assert read_failures(rundir) == [first, second, third]
    assert first["run_start"] == "2031-05-06T07:08:09Z" and second["run_start"] == "2031-05-07T00:00:00Z"
    assert {k: first[k] for k in FAILURE} == FAILURE and second["key"] is None and second["traceback"] is None

    if kind == "local":
        raw = rundir.read_bytes(rundir.path(FAILURES))
        assert raw.isascii() and b"\x1b" not in raw and len(raw.splitlines()) == 3  # safe to cat, one per line
    else:  # no append on object stores: a new part per record, none rewritten
        parts = rundir.list_names("failures")
        assert len(parts) == 3 and not rundir.exists(FAILURES)
        assert all(rundir.read_bytes(rundir.path("failures", p)).isascii() for p in parts)


def test_read_failures_skips_a_line_cut_short(tmp_path, caplog):
    rundir = RunDir(str(tmp_path / "run"))
    entry = FailureLog(rundir, STARTED).record(stage="chunks", shard=1, message="boom")
    with open(rundir.path(FAILURES), "a") as f:
        f.write('{"stage": "detect", "sha')  # a crash in the middle of an append
    with caplog.at_level(logging.WARNING):
        assert read_failures(rundir) == [entry]
    assert "line 2 is not JSON" in caplog.text


def test_report_links_the_logs_and_the_failures(tmp_path):
    from test_report_support import write_fixture_run

    from grit_pipeline.report.build import ReportOptions, build_report

    run = write_fixture_run(tmp_path / "run", shards=1, rows_per_shard=6)
    rundir = RunDir(str(run.root))
    empty = (run.root / "report" / "index.html")
    build_report(str(run.root), ReportOptions(sample=2))
    assert 'data-failures="0"' in empty.read_text() and "No run logs" in empty.read_text()

    handler = RunLogHandler(rundir, STARTED)
    _logger(handler).info("run started")
    handler.close()
    FailureLog(rundir, STARTED).record(**FAILURE)
    FailureLog(rundir, STARTED).record(stage="detect", shard=8, message="second <b>not bold</b>")
    build_report(str(run.root), ReportOptions(sample=2))
    html = empty.read_text()
    assert 'href="../logs/20310506T070809Z.log"' in html and 'href="../failures.jsonl"' in html
    assert 'data-failures="2"' in html and 'data-stage="detect" data-count="2"' in html
    assert 'data-shard="7"' in html and 'data-shard="8"' in html
    assert "\x1b" not in html and "\\x1b[31mred" in html
    assert "second &lt;b&gt;not bold&lt;/b&gt;" in html and "<b>not bold" not in html  # HTML-escaped
    assert (run.root / "logs" / "20310506T070809Z.log").exists()  # the link points at a real file
