"""The driver's bookkeeping (`grit_pipeline.engine.bookkeeping`) and what `grit status` reads of it, without
Ray: markers written in stage order off the scheduling loop, ledger records and progress.json, a commit
that cannot be written failing only its shard, ledgers caught up from or rebuilt to the markers, and a
status that reads a few objects whatever the number of shards."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from grit_pipeline.commands.status import StatusReader, rebuild_ledgers, run_status
from grit_pipeline.engine.bookkeeping import Bookkeeper, open_ledger
from grit_pipeline.engine.summary import stage_fold
from grit_pipeline.errors import UserError
from grit_pipeline.rundir.ledger import ledger_folder, read_ledger
from grit_pipeline.rundir.progress import read_progress
from grit_pipeline.rundir.store import RunDir
from grit_pipeline.shard_ranges import ShardRanges

STAGES = ["ingest", "chunks", "detect"]
FPS = {"ingest": "f1" * 8, "chunks": "f2" * 8, "detect": "f3" * 8}


def marker(stage: str, shard: int, rows: int = 10) -> dict:
    return {"stage": stage, "fingerprint": FPS[stage], "shard": shard, "rows_in": rows, "rows": rows - 1,
            "rejects": 1, "reject_reasons": {"no_box": 1}, "files": {f"shard-{shard:05d}.parquet": {"size": 1}}}


STATS = {"counters": {"c": 2}, "seconds": 0.25, "peak_rss_mb": 50.0}


def keeper_for(rundir: RunDir, **kw) -> Bookkeeper:
    ledgers = {s: open_ledger(rundir, s, FPS[s], ShardRanges()) for s in STAGES}
    rundir.write_text("run.yaml", yaml.safe_dump({"fingerprints": FPS, "layout": 2, "planned_shards": "0-9"},
                                                  sort_keys=False))
    return Bookkeeper(rundir, ledgers, stage_order=STAGES, fingerprints=FPS, view={"run_start": "x"}, **kw)


def drain(keeper: Bookkeeper, n: int, timeout: float = 30.0) -> list:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        keeper.wait(0.1)
        got.extend(keeper.events())
    assert len(got) == n, got
    return got


def test_markers_ledgers_and_progress_are_written_off_the_loop(tmp_path):
    rundir = RunDir(str(tmp_path / "run"))
    keeper = keeper_for(rundir, flush_s=0.0)
    for shard in range(4):
        keeper.commit("ingest", shard, marker("ingest", shard), STATS)
    keeper.commit("chunks", 0, marker("chunks", 0), STATS)
    events = drain(keeper, 5)
    assert all(e.error is None for e in events)
    assert rundir.committed("ingest", FPS["ingest"]) == {0, 1, 2, 3}
    assert rundir.markers("chunks", FPS["chunks"], [0])[0] == marker("chunks", 0)
    keeper.set_view(stages={"chunks": {"inflight": "1-3"}}, failures=0, published=0)
    keeper.close("finished")
    fold, found = read_ledger(rundir, ledger_folder("ingest", FPS["ingest"]))
    assert found and str(fold.committed) == "0-3" and fold.rows_in == 40 and fold.counters == {"c": 8}
    progress = read_progress(rundir)
    assert progress["state"] == "finished" and progress["stages"]["chunks"]["inflight"] == "1-3"
    assert progress["stages"]["ingest"]["ledger"] == [0, 4]


def test_a_marker_that_cannot_be_written_fails_its_shard_and_its_later_stages(tmp_path, monkeypatch):
    rundir = RunDir(str(tmp_path / "run"))
    keeper = keeper_for(rundir, flush_s=0.0)
    bad = rundir.marker_path("ingest", FPS["ingest"], 1)
    real_put = rundir.put_atomic

    def put(path, data):
        if path == bad:
            raise PermissionError(13, "refused", path)
        return real_put(path, data)

    monkeypatch.setattr(rundir, "put_atomic", put)
    monkeypatch.setattr("grit_pipeline.engine.bookkeeping.with_retries", lambda fn, **kw: fn())
    keeper.commit("ingest", 0, marker("ingest", 0), STATS)
    keeper.commit("ingest", 1, marker("ingest", 1), STATS)
    keeper.commit("chunks", 1, marker("chunks", 1), STATS)  # the loop moved shard 1 on already
    events = {(e.stage, e.shard): e.error for e in drain(keeper, 3)}
    keeper.close()
    assert events[("ingest", 0)] is None
    assert "cannot commit shard 1" in events[("ingest", 1)] and "refused" in events[("ingest", 1)]
    assert "earlier stage" in events[("chunks", 1)]
    assert rundir.committed("ingest", FPS["ingest"]) == {0} and rundir.committed("chunks", FPS["chunks"]) == set()
    assert str(read_ledger(rundir, ledger_folder("ingest", FPS["ingest"]))[0].committed) == "0"


def test_abort_writes_nothing_more(tmp_path):
    rundir = RunDir(str(tmp_path / "run"))
    keeper = keeper_for(rundir, flush_s=3600.0)
    started = rundir.read_bytes(rundir.path("progress.json"))  # `running`, written before any marker
    assert read_progress(rundir)["state"] == "running"
    keeper.abort()
    keeper.commit("ingest", 0, marker("ingest", 0), STATS)
    time.sleep(0.3)
    assert rundir.committed("ingest", FPS["ingest"]) == set()
    assert rundir.read_bytes(rundir.path("progress.json")) == started


def test_a_ledger_catches_up_with_the_markers_and_is_rebuilt_when_it_claims_too_much(tmp_path):
    rundir = RunDir(str(tmp_path / "run"))
    for shard in range(5):
        rundir.write_marker("ingest", FPS["ingest"], shard, marker("ingest", shard))
    w = open_ledger(rundir, "ingest", FPS["ingest"], ShardRanges(range(3)))  # the listing saw 0-2 only
    assert str(w.fold.committed) == "0-2"
    w = open_ledger(rundir, "ingest", FPS["ingest"], ShardRanges(range(5)))  # 3, 4 committed after a crash
    assert str(w.fold.committed) == "0-4" and w.fold.rows_in == 50
    (tmp_path / "run/stages/ingest" / FPS["ingest"] / "_done/shard-00004").unlink()  # someone removed a marker
    w = open_ledger(rundir, "ingest", FPS["ingest"], ShardRanges(range(4)))
    assert str(w.fold.committed) == "0-3" and w.fold.rows_in == 40
    assert str(read_ledger(rundir, ledger_folder("ingest", FPS["ingest"]))[0].committed) == "0-3"


@pytest.mark.parametrize("damage", ["delete_summary", "truncate_segment", "delete_all"])
def test_a_damaged_ledger_is_rebuilt_from_the_markers(tmp_path, damage):
    rundir = RunDir(str(tmp_path / "run"))
    keeper = keeper_for(rundir, flush_s=0.0)
    for shard in range(6):
        keeper.commit("ingest", shard, marker("ingest", shard), STATS)
    drain(keeper, 6)
    keeper.close()
    folder = tmp_path / "run/stages/ingest" / FPS["ingest"] / "_ledger"
    if damage == "delete_summary":
        (folder / "summary.json").unlink()
    elif damage == "truncate_segment":
        seg = folder / "seg-000000.jsonl"
        seg.write_text(seg.read_text()[: len(seg.read_text()) // 2])
    else:
        for p in folder.iterdir():
            p.unlink()
    rebuilt = rebuild_ledgers(rundir)
    assert rebuilt["ingest"] == 6
    ingest = run_status(rundir)["stages"][0]
    assert ingest["committed"] == 6 and ingest["rows_in"] == 60 and ingest["source"] == "ledger"
    assert stage_fold(rundir, "ingest", FPS["ingest"]).rows_out == 54


def test_rebuild_is_refused_while_a_run_holds_the_lease(tmp_path):
    from grit_pipeline.rundir.lease import Lease

    rundir = RunDir(str(tmp_path / "run"))
    keeper_for(rundir).close()
    with Lease.acquire(rundir, stale_after_s=600, command="grit run"), pytest.raises(UserError, match="live"):
        rebuild_ledgers(rundir)


class CountingFS:
    """Counts the requests a reader makes through a RunDir's filesystem (reads, listings, existence checks)."""

    METHODS = ("cat_file", "cat", "info", "ls", "exists", "open", "_open", "isfile", "isdir", "find", "glob")

    def __init__(self, rundir: RunDir):
        self.calls: list[tuple[str, str]] = []
        for name in self.METHODS:
            real = getattr(rundir.fs, name)

            def counted(*args, _name=name, _real=real, **kw):
                self.calls.append((_name, str(args[0]) if args else ""))
                return _real(*args, **kw)

            setattr(rundir.fs, name, counted)


def test_status_reads_a_few_objects_whatever_the_number_of_shards(tmp_path):
    counts = {}
    for shards in (50, 2000):
        rundir = RunDir(str(tmp_path / f"run{shards}"))
        keeper = keeper_for(rundir, flush_s=3600.0)
        for stage in STAGES:
            for shard in range(shards):
                keeper.commit(stage, shard, marker(stage, shard), STATS)
        keeper.close()
        rundir.write_text("run.yaml", yaml.safe_dump({"fingerprints": FPS, "layout": 2,
                                                      "planned_shards": f"0-{shards + 99}"}, sort_keys=False))
        reader_dir = RunDir(str(tmp_path / f"run{shards}"))
        counter = CountingFS(reader_dir)
        reader = StatusReader(reader_dir)
        status = reader.read()
        assert [s["committed"] for s in status["stages"]] == [shards] * 3
        assert all(s["pending"] == 100 and s["source"] == "ledger" for s in status["stages"])
        assert not any("_done" in path for _, path in counter.calls)  # no marker read, no listing of them
        counts[shards] = len(counter.calls)
        counter.calls.clear()
        reader.read()  # a --watch refresh: progress.json says no ledger moved
        refresh = len(counter.calls)
        assert refresh <= 10, counter.calls
    assert counts[2000] == counts[50], counts  # 2 sealed segments of 1,000 are folded in the summary


def test_status_of_a_ledger_run_shows_failures_and_in_flight(tmp_path):
    rundir = RunDir(str(tmp_path / "run"))
    keeper = keeper_for(rundir, flush_s=0.0)
    keeper.commit("ingest", 0, marker("ingest", 0), STATS)
    keeper.fail("chunks", 0, {"failed": "boom \x1b[2J", "error_type": "ValueError", "key": "k0"})
    keeper.set_view(stages={"ingest": {"inflight": "1-2"}})
    drain(keeper, 1)
    time.sleep(0.5)  # the flush after the failure record
    status = run_status(rundir)
    chunks = status["stages"][1]
    assert chunks["failed"] == 1 and chunks["failed_shards"] == [0] and status["failures"] == 1
    assert status["latest_failures"][-1]["message"] == "boom \x1b[2J" and status["latest_failures"][-1]["key"] == "k0"
    assert status["stages"][0]["inflight"] == 2 and status["state"] == "running"
    keeper.close()
    assert run_status(rundir)["stages"][0]["inflight"] == 0  # the run ended: nothing in flight
    assert json.loads((tmp_path / "run/progress.json").read_text())["state"] == "finished"


def test_the_next_plan_takes_a_cleanly_finished_runs_commits_from_the_ledgers(tmp_path):
    """After a run that finished, `build_plan` takes each stage's committed shards from its ledger (no
    `_done/` listing); not after a run that did not finish, nor for a ledger written since, nor without
    progress.json -- those stages are listed."""
    from grit_pipeline.engine.plan import ledger_committed

    rundir = RunDir(str(tmp_path / "run"))
    keeper = keeper_for(rundir, flush_s=0.0)
    assert ledger_committed(rundir, FPS) == {}  # this run is `running`
    for shard in (0, 1, 2, 5):
        keeper.commit("ingest", shard, marker("ingest", shard), STATS)
    keeper.commit("chunks", 0, marker("chunks", 0), STATS)
    drain(keeper, 5)
    keeper.close("finished")
    trusted = ledger_committed(rundir, FPS)
    assert {s: str(r) for s, r in trusted.items()} == {"ingest": "0-2,5", "chunks": "0", "detect": ""}
    assert all(set(trusted[s]) == rundir.committed(s, FPS[s]) for s in STAGES)
    assert ledger_committed(rundir, {**FPS, "detect": "another"}).keys() == {"ingest", "chunks"}

    w = open_ledger(rundir, "chunks", FPS["chunks"], ShardRanges([0]))  # something wrote to a ledger since
    w.append([{"shard": 7, "rows": 1, "files": {}}])
    w.flush()
    assert ledger_committed(rundir, FPS).keys() == {"ingest", "detect"}

    keeper = keeper_for(rundir, flush_s=0.0)  # a run that starts and stops (a crash leaves `running`)
    keeper.close("stopped")
    assert ledger_committed(rundir, FPS) == {}
    keeper_for(rundir, flush_s=0.0).close("finished")
    assert ledger_committed(rundir, FPS).keys() == set(STAGES)
    rundir.fs.rm(rundir.path("progress.json"))  # what the docs say to do after removing markers by hand
    assert ledger_committed(rundir, FPS) == {}


def test_a_run_that_cannot_write_progress_json_does_not_start(tmp_path, monkeypatch):
    """`running` must replace a `finished` progress.json before any marker, or the next plan would trust
    ledgers that this run's markers have outgrown."""
    rundir = RunDir(str(tmp_path / "run"))
    monkeypatch.setattr("grit_pipeline.engine.bookkeeping.with_retries", lambda fn, **kw: fn())
    monkeypatch.setattr("grit_pipeline.engine.bookkeeping.write_progress",
                        lambda *a: (_ for _ in ()).throw(PermissionError(13, "refused", "progress.json")))
    with pytest.raises(PermissionError):
        keeper_for(rundir, flush_s=0.0)
