"""The run lease (`grit_pipeline.rundir.lease`) on real stores: a local disk, memory://, and S3 (moto, serving one
request at a time as AWS applies conditional writes). Acquire, refuse with the holder named, stale
takeover, heartbeat, a lost lease, release; processes racing for one lease; a holder that died here."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from moto_s3 import s3  # noqa: F401 - a fixture

from grit_pipeline.rundir.conditional_write import (
    Conflict,
    LockedLocalFile,
    S3ConditionalFile,
    conditional_file,
)
from grit_pipeline.rundir.lease import LEASE_FILE, Lease, LeaseHeld, LeaseLost, read_lease
from grit_pipeline.rundir.store import RunDir

REPO = Path(__file__).resolve().parent.parent
STORES = ["local", "memory", "s3"]


class Store:
    """A fresh run directory on one kind of store, and a way to age its lease file."""

    def __init__(self, kind: str, tmp_path: Path, s3_server=None):
        self.kind = kind
        self.storage_options: dict = {}
        if kind == "local":
            self.uri = str(tmp_path / "run")
        elif kind == "memory":
            self.uri = f"memory://lease-{uuid.uuid4().hex}/run"
        else:
            self.uri = f"s3://{s3_server.new_bucket()}/run"
            self.storage_options = s3_server.storage_options
        self.rundir = RunDir(self.uri, self.storage_options)

    def age_lease(self, seconds: float, s3_wait: float = 2.2) -> float:
        """Make the lease file's modification time `seconds` older; returns the stale limit to use. S3
        cannot back-date an object: there the test waits `s3_wait` seconds, past a 1 s limit, instead."""
        path = self.rundir.path(LEASE_FILE)
        if self.kind == "local":
            st = os.stat(path)
            os.utime(path, (st.st_atime - seconds, st.st_mtime - seconds))
            return seconds / 2
        if self.kind == "memory":
            f = self.rundir.fs.store[self.rundir.fs._strip_protocol(path)]
            f.created = datetime.now(timezone.utc) - timedelta(seconds=seconds)
            if hasattr(f, "modified"):
                f.modified = f.created
            return seconds / 2
        time.sleep(s3_wait)  # LastModified and Date have one-second resolution
        return 1.0


@pytest.fixture(params=STORES)
def store(request, tmp_path):
    server = request.getfixturevalue("s3") if request.param == "s3" else None
    return Store(request.param, tmp_path, server)


def test_each_store_gets_its_exact_kind_of_conditional_write(tmp_path, s3):  # noqa: F811
    assert isinstance(conditional_file(RunDir(str(tmp_path)), LEASE_FILE), LockedLocalFile)
    s3_file = conditional_file(RunDir(f"s3://{s3.new_bucket()}/run", s3.storage_options), LEASE_FILE)
    assert isinstance(s3_file, S3ConditionalFile)
    s3_file.create(b"x")  # moto honours If-None-Match: no fallback to check-then-write
    assert s3_file.fallback is None and s3_file.guarantee.startswith("exact")


def test_a_store_that_ignores_if_none_match_falls_back_to_check_then_write(s3, caplog):  # noqa: F811
    """Some S3-compatible stores accept `If-None-Match` and ignore it. The create notices (its second
    conditional create succeeds too), says so, keeps its own write when nothing came after it, and from
    then on checks and reads back; a create over an existing lease is refused either way."""

    class IgnoresConditions(S3ConditionalFile):
        def _call(self, method, **kwargs):
            kwargs.pop("IfNoneMatch", None)
            kwargs.pop("IfMatch", None)
            return super()._call(method, **kwargs)

    rundir = RunDir(f"s3://{s3.new_bucket()}/run", s3.storage_options)
    lease = IgnoresConditions(rundir, LEASE_FILE)
    with caplog.at_level(logging.WARNING):
        version = lease.create(b"first")
    assert "ignores If-None-Match" in caplog.text and lease.fallback is not None
    assert not lease.guarantee.startswith("exact")
    stamped, _ = lease.read()
    assert stamped.data == b"first" and stamped.version == version
    with pytest.raises(FileExistsError):
        IgnoresConditions(rundir, LEASE_FILE).create(b"second")
    assert lease.read()[0].data == b"first"


def test_a_store_that_refuses_if_match_compares_versions_by_hand(s3):  # noqa: F811
    """Older S3-compatible stores answer If-Match with NotImplemented: replace and delete then compare the
    ETag themselves, still refusing a stale version."""

    class RefusesIfMatch(S3ConditionalFile):
        def _call(self, method, **kwargs):
            if "IfMatch" in kwargs:
                error = OSError("not implemented")
                error.response = {"Error": {"Code": "NotImplemented"}}
                raise error
            return super()._call(method, **kwargs)

    rundir = RunDir(f"s3://{s3.new_bucket()}/run", s3.storage_options)
    lease = RefusesIfMatch(rundir, LEASE_FILE)
    first = lease.create(b"first")
    second = lease.replace(b"second", first)
    assert lease.read()[0].data == b"second"
    with pytest.raises(Conflict):
        RefusesIfMatch(rundir, LEASE_FILE).replace(b"third", first)  # stale version
    with pytest.raises(Conflict):
        RefusesIfMatch(rundir, LEASE_FILE).delete(first)
    lease.delete(second)  # a version is the token of the file object that issued it
    assert lease.read()[0] is None


def test_acquire_refuse_release(store):
    lease = Lease.acquire(store.rundir, stale_after_s=600, command="grit run --output here")
    state = read_lease(store.rundir)
    assert state["token"] == lease.token and state["pid"] == os.getpid() and state["live"]
    assert state["command"] == "grit run --output here" and state["clock"] == "store"
    assert 0 <= state["age_s"] < 600

    with pytest.raises(LeaseHeld) as refused:
        Lease.acquire(store.rundir, stale_after_s=600, command="grit run again")
    message = str(refused.value)
    assert f"pid {os.getpid()}" in message and "grit run --output here" in message
    assert "last heartbeat" in message and " s ago" in message and store.uri in message
    assert read_lease(store.rundir)["token"] == lease.token  # the refused run changed nothing

    lease.release()
    assert read_lease(store.rundir) is None
    again = Lease.acquire(store.rundir, stale_after_s=600, command="grit run again")
    assert read_lease(store.rundir)["token"] == again.token
    again.release()


def test_stale_lease_is_taken_over_and_its_holder_loses_it(store, caplog):
    old = Lease.acquire(store.rundir, stale_after_s=600, command="grit run old")
    limit = store.age_lease(1000)
    assert not read_lease(store.rundir)["live"] or store.kind == "s3"  # s3: the holder's limit is 600 s
    with caplog.at_level(logging.WARNING, logger="grit_pipeline.rundir.lease"):
        new = Lease.acquire(store.rundir, stale_after_s=limit, command="grit run new")
    assert read_lease(store.rundir)["token"] == new.token
    assert any("took over the lease" in r.getMessage() and "grit run old" in r.getMessage()
               for r in caplog.records)

    with pytest.raises(LeaseLost, match="grit run new"):
        old.heartbeat()
    assert old.lost is not None
    old.release()  # not ours any more: left alone
    assert read_lease(store.rundir)["token"] == new.token
    new.heartbeat()
    new.release()
    assert read_lease(store.rundir) is None


def test_a_removed_lease_is_lost(store):
    lease = Lease.acquire(store.rundir, stale_after_s=600, command="grit run")
    store.rundir.fs.rm(store.rundir.path(LEASE_FILE))
    with pytest.raises(LeaseLost, match="removed"):
        lease.heartbeat()
    lease.release()  # nothing to release, no error
    assert read_lease(store.rundir) is None


def test_heartbeat_refreshes_the_age(store):
    lease = Lease.acquire(store.rundir, stale_after_s=600, command="grit run")
    store.age_lease(1000)
    aged = read_lease(store.rundir)["age_s"]
    lease.heartbeat()
    fresh = read_lease(store.rundir)
    assert fresh["age_s"] < aged and fresh["token"] == lease.token
    assert fresh["heartbeat"] >= lease.doc["started"]
    lease.release()


def test_heartbeat_thread_keeps_the_lease_and_reports_its_loss(tmp_path):
    rundir = RunDir(str(tmp_path / "run"))
    lease = Lease.acquire(rundir, stale_after_s=600, command="grit run")
    lost: list[LeaseLost] = []
    called = threading.Event()
    lease.start_heartbeat(every_s=0.05, on_lost=lambda e: (lost.append(e), called.set()))
    store = Store("local", tmp_path)
    store.rundir = rundir
    store.age_lease(1000)
    deadline = time.monotonic() + 30
    while read_lease(rundir)["age_s"] > 100:  # the thread refreshes it
        assert time.monotonic() < deadline, "the heartbeat thread never refreshed the lease"
        time.sleep(0.02)
    store.age_lease(1000)
    thief = Lease.acquire(rundir, stale_after_s=500, command="grit run thief")
    assert called.wait(30), "on_lost was not called"
    assert "grit run thief" in str(lost[0])
    with pytest.raises(LeaseLost):
        lease.check()
    lease.release()
    assert read_lease(rundir)["token"] == thief.token
    thief.release()


def test_a_lease_left_by_a_dead_process_on_this_machine_is_taken_over_at_once(tmp_path, caplog):
    run = tmp_path / "run"
    code = ("import sys, os; from grit_pipeline.rundir.store import RunDir; from grit_pipeline.rundir.lease import Lease; "
            "Lease.acquire(RunDir(sys.argv[1]), stale_after_s=600, command='grit run killed'); os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(run)], check=True, cwd=REPO, timeout=120)
    left = read_lease(RunDir(str(run)))
    assert left["command"] == "grit run killed" and left["live"]  # fresh, but its process is gone
    with caplog.at_level(logging.WARNING, logger="grit_pipeline.rundir.lease"):
        lease = Lease.acquire(RunDir(str(run)), stale_after_s=600, command="grit run next")
    assert any(f"process {left['pid']} no longer exists" in r.getMessage() for r in caplog.records)
    lease.release()


RACER = """
import json, os, sys, time
from grit_pipeline.rundir.store import RunDir
from grit_pipeline.rundir.lease import Lease, LeaseHeld
uri, options, folder, name, stale = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])
rundir = RunDir(uri, options)
open(os.path.join(folder, name + ".ready"), "w").close()
while not os.path.exists(os.path.join(folder, "go")):
    time.sleep(0.001)
try:
    lease = Lease.acquire(rundir, stale_after_s=stale, command="racer " + name)
    result = "won " + lease.token
except LeaseHeld:
    result = "held"
with open(os.path.join(folder, name + ".result"), "w") as f:
    f.write(result)
while not os.path.exists(os.path.join(folder, "end")):  # hold on: a dead winner could be taken over
    time.sleep(0.01)
"""


@pytest.mark.parametrize("kind", ["local", pytest.param("s3", marks=pytest.mark.slow)])
@pytest.mark.parametrize("takeover", [False, True], ids=["free", "stale"])
def test_processes_racing_for_the_lease_have_exactly_one_winner(kind, takeover, tmp_path, request):
    """Four processes take the lease at once: of a free run directory, or of one whose lease is stale."""
    store = Store(kind, tmp_path, request.getfixturevalue("s3") if kind == "s3" else None)
    stale = 600.0
    if takeover:
        Lease.acquire(store.rundir, stale_after_s=600, command="grit run stale")
        store.age_lease(1000, s3_wait=3.2)
        stale = 1.5 if kind == "s3" else 500.0  # s3: a racer's fresh lease cannot look 1.5 s old in time
    folder = tmp_path / "race"
    folder.mkdir()
    n = 4
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, store.uri, json.dumps(store.storage_options),
                               str(folder), f"r{i}", str(stale)], cwd=REPO, env=env) for i in range(n)]
    try:
        deadline = time.monotonic() + 120
        while len(list(folder.glob("*.ready"))) < n:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "racers did not start"
            time.sleep(0.05)
        (folder / "go").touch()
        while len(list(folder.glob("*.result"))) < n:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "racers did not finish"
            time.sleep(0.05)
        results = [(folder / f"r{i}.result").read_text() for i in range(n)]
        winners = [r.split()[1] for r in results if r.startswith("won")]
        assert len(winners) == 1 and results.count("held") == n - 1, results
        assert read_lease(store.rundir)["token"] == winners[0]
    finally:
        (folder / "end").touch()
        for p in procs:
            p.wait(timeout=60)
