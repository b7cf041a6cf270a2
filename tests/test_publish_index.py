"""The publisher at scale (no Ray): its key index (sorted runs + one filter, persisted in the run
directory), its ledger (one record per published shard, folded), resuming after a crash from the index
and the ledger, re-runs that read no per-shard publish file, and what stays true under hash collisions."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grit_pipeline.engine import key_index as K
from grit_pipeline.engine import publish as P
from grit_pipeline.engine.key_index import IndexStore, KeyIndex, kway_merge
from grit_pipeline.engine.publish import Publisher, PublishReport, read_published, remove_stale
from grit_pipeline.rundir import ledger as L
from grit_pipeline.rundir.store import RunDir, ShardFiles
from grit_pipeline.shard_ranges import ShardRanges
from schemas.tables import GRIT_SCHEMA, REJECT_SCHEMA


@pytest.fixture
def small_index(monkeypatch):
    """Index sizes small enough that a test's few shards make several runs and merges."""
    monkeypatch.setattr(K, "MEMTABLE_KEYS", 50)
    monkeypatch.setattr(K, "MEMTABLE_SHARDS", 3)
    monkeypatch.setattr(K, "MERGE_CHUNK", 7)
    monkeypatch.setattr(K, "FANOUT", 2)


def _grit_rows(keys: list[str]) -> pa.Table:
    return pa.Table.from_pylist([{"key": k, "url": None, "caption": "a dog", "width": 4, "height": 4,
                                  "noun_chunks": [[0, 5, 0.1, 0.1, 0.5, 0.5, 0.9]],
                                  "ref_exps": [[0, 5, 0.1, 0.1, 0.5, 0.5, 0.9]],
                                  "grounded_caption": "g", "markdown_caption": "m"} for k in keys], schema=GRIT_SCHEMA)


def _no_rejects() -> pa.Table:
    return pa.Table.from_pylist([], schema=REJECT_SCHEMA)


def _commit(run: RunDir, shards: dict[int, list[str]], fp: str = "fpA") -> dict[int, str]:
    """Commit compose outputs; returns each shard's compose sha256 (what the driver passes on)."""
    shas = {}
    for shard, keys in shards.items():
        marker = run.commit_shard("compose", fp, shard, ShardFiles(_grit_rows(keys), _no_rejects(), {}))
        shas[shard] = marker["files"][f"shard-{shard:05d}.parquet"]["sha256"]
    return shas


class Reads:
    """Paths read through a filesystem (every read of the run directory goes through one of these)."""

    def __init__(self, monkeypatch, fs):
        self.paths: list[str] = []
        for name in ("open", "cat_file", "get_file"):
            real = getattr(fs, name)

            def spy(path, *a, _real=real, _name=name, **kw):
                if _name != "open" or "r" in (a[0] if a else kw.get("mode", "rb")):
                    self.paths.append(str(path))
                return _real(path, *a, **kw)

            monkeypatch.setattr(fs, name, spy)

    def under(self, part: str) -> set[str]:
        return {p for p in self.paths if f"/{part}" in p}


# --- shard ranges -----------------------------------------------------------------------------------
def test_shard_range_set_operations_match_plain_sets():
    rng = random.Random(3)
    for _ in range(300):
        a = {rng.randrange(60) for _ in range(rng.randrange(40))}
        b = {rng.randrange(60) for _ in range(rng.randrange(40))}
        ra, rb = ShardRanges(a), ShardRanges(b)
        assert list(ra.intersection(rb)) == sorted(a & b)
        assert list(ra.difference(rb)) == sorted(a - b)
        assert ra.intersection(rb) == ShardRanges(a & b) and ra.difference(rb) == ShardRanges(a - b)


# --- the index --------------------------------------------------------------------------------------
def test_kway_merge_is_a_sorted_merge():
    rng = np.random.default_rng(0)
    arrays = [np.sort(rng.integers(0, 50, rng.integers(0, 40)).astype(np.uint64)) for _ in range(7)]

    def pieces(a, i):
        for j in range(0, len(a), 5):
            yield a[j:j + 5], np.full(len(a[j:j + 5]), i, np.int64)

    out = list(kway_merge([pieces(a, i) for i, a in enumerate(arrays)]))
    h = np.concatenate([o[0] for o in out])
    s = np.concatenate([o[1] for o in out])
    assert h.tolist() == sorted(np.concatenate(arrays).tolist())
    pairs = sorted(zip(h.tolist(), s.tolist(), strict=True))
    assert pairs == sorted((v, i) for i, a in enumerate(arrays) for v in a.tolist())


@pytest.mark.parametrize("where", ["local", "memory"])
def test_key_index_answers_like_a_dict_through_merges_restrictions_and_reopening(small_index, tmp_path, where):
    rundir = RunDir(str(tmp_path / "run") if where == "local" else f"memory://keyindex-{tmp_path.name}")
    rng = np.random.default_rng(7)
    index = KeyIndex(IndexStore(rundir, "publish/_index"), str(tmp_path / "work"))
    truth: dict[int, int] = {}
    for shard in range(40):
        h = rng.integers(0, 2**63, rng.integers(0, 30), dtype=np.uint64)
        index.add(h, shard)
        for x in h.tolist():
            truth.setdefault(x, shard)
    assert len(index.runs) <= 12  # merged: O(log N) runs, not one per flush
    keys = np.array(sorted(truth), np.uint64)
    want = np.array([truth[k] for k in keys.tolist()])
    covered = ShardRanges()
    for r in index.runs:
        covered.update(r.valid)
    on_disk = np.array([s in covered for s in want.tolist()])
    assert (index.lookup(keys) == want).all()
    assert (index.lookup(rng.integers(2**63, 2**64 - 1, 500, dtype=np.uint64)) == -1).all()

    index.persist()
    again = KeyIndex.open(IndexStore(rundir, "publish/_index"), str(tmp_path / "work2"))
    got = again.lookup(keys)  # the in-memory shards of the first index were never persisted
    assert (got[on_disk] == want[on_disk]).all() and (got[~on_disk] == -1).all()
    again.restrict(ShardRanges.parse("0-9,20"))
    keep = np.isin(want, list(range(10)) + [20]) & on_disk
    got = again.lookup(keys)
    assert (got[keep] == want[keep]).all() and (got[~keep] == -1).all()
    again.add(np.empty(0, np.uint64), 41)
    for _ in range(5):  # more flushes: merges now drop the forgotten entries
        again.add(rng.integers(2**63, 2**64 - 1, 30, dtype=np.uint64), 50)
    got = again.lookup(keys)
    assert (got[keep] == want[keep]).all() and (got[~keep] == -1).all()
    index.close()
    again.close()


def test_colliding_hashes_are_all_returned():
    index = KeyIndex()
    h = np.array([5, 9], np.uint64)
    index.add(h, 0)
    index.add(np.array([9], np.uint64), 3)
    index.flush()
    index.add(np.array([9], np.uint64), 4)
    idx, shards = index.holders(np.array([9, 5, 1], np.uint64))
    assert sorted(zip(idx.tolist(), shards.tolist(), strict=True)) == [(0, 0), (0, 3), (0, 4), (1, 0)]
    index.close()


# --- the publisher ----------------------------------------------------------------------------------
def test_a_hash_collision_is_never_a_duplicate(tmp_path, monkeypatch):
    """Every key hashes alike: each hash hit is checked against the holder's real keys."""
    monkeypatch.setattr(P, "key_hashes", lambda keys: np.full(len(list(keys)), 42, np.uint64))
    run = RunDir(str(tmp_path / "run"))
    shas = _commit(run, {0: ["a", "b"], 1: ["c"], 2: ["d", "a"], 3: ["e"]})
    reports = Publisher(run, "compose", "fpA", {}).publish([0, 1, 2, 3], shas, "")
    assert [(r.rows_out, r.duplicates) for r in reports] == [(2, 0), (1, 0), (1, 1), (1, 0)]
    rejects = pq.read_table(run.path("publish", "shard-00002.rejects.parquet")).to_pylist()
    assert [(r["key"], r["detail"]) for r in rejects] == [("a", "key also in shard-00000, which is kept")]


def test_a_restarted_publisher_resumes_its_index_and_reads_only_the_last_few_key_files(
        small_index, tmp_path, monkeypatch):
    run = RunDir(f"memory://publisher-restart-{tmp_path.name}")
    shards = {s: [f"k{s}-{i}" for i in range(4)] for s in range(10)}
    shas = _commit(run, shards)
    first = Publisher(run, "compose", "fpA", {}, workdir=str(tmp_path / "w1"))
    first.publish(list(range(10)), shas, "")
    assert len(first.index.mem) == 1  # shard 9 is in memory only; 0-8 are in persisted runs
    del first  # dies: no finish(), nothing more written

    more = _commit(run, {10: ["k2-1", "new", "k9-3"]})
    reads = Reads(monkeypatch, run.fs)
    second = Publisher(run, "compose", "fpA", {}, workdir=str(tmp_path / "w2"))  # what Ray restarts
    [report] = second.publish([10], more, "0-9")
    assert (report.rows_in, report.rows_out, report.duplicates, report.reused) == (3, 1, 2, False)
    assert reads.under("publish/shard-") == {run.path("publish", "shard-00009.keys")}  # not one per shard
    index_objects = reads.under("publish/_index/")
    assert run.path("publish/_index/manifest.json") in index_objects and len(index_objects) <= 6
    assert reads.under("grit/") == {run.final_path(2), run.final_path(9)}  # the hits, confirmed
    details = pq.read_table(run.path("publish", "shard-00010.rejects.parquet"), filesystem=run.fs)["detail"]
    assert details.to_pylist() == ["key also in shard-00002, which is kept", "key also in shard-00009, which is kept"]
    run.fs.rm(run.root, recursive=True)


def test_a_rerun_of_a_finished_run_republishes_nothing_and_reads_no_per_shard_publish_file(tmp_path, monkeypatch):
    run = RunDir(str(tmp_path / "run"))
    shas = _commit(run, {s: [f"k{s}-{i}" for i in range(3)] + ["dup-key"] for s in range(12)})
    publisher = Publisher(run, "compose", "fpA", {})
    publisher.publish(list(range(6)), {s: shas[s] for s in range(6)}, "")
    publisher.publish(list(range(6, 12)), {s: shas[s] for s in range(6, 12)}, "0-5")
    assert publisher.finish() == []
    view, found = read_published(run, "fpA")
    assert found and str(view.shards) == "0-11" and (view.rows_in, view.rows_out, view.duplicates) == (48, 37, 11)

    reads = Reads(monkeypatch, run.fs)
    again = Publisher(run, "compose", "fpA", {})
    reports = again.publish(list(range(12)), shas, "")
    assert all(r.reused for r in reports) and sum(r.rows_out for r in reports) == 37
    assert again.finish() == []
    assert not reads.under("publish/shard-") and not reads.under("grit/") and not reads.under("stages/")
    assert reads.under("publish/_ledger/") <= {run.path("publish/_ledger", n) for n in ("summary.json", "seg-000000.jsonl")}
    # without the compose hashes the publisher reads each shard's compose marker instead (one request each)
    reads.paths.clear()
    Publisher(run, "compose", "fpA", {}).publish(list(range(12)), None, "")
    assert len(reads.under("stages/compose/fpA/_done/")) == 12 and not reads.under("publish/shard-")


def test_the_fold_counts_the_latest_record_of_each_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(L, "SEGMENT_RECORDS", 3)
    run = RunDir(str(tmp_path / "run"))
    shas = _commit(run, {0: ["a"], 2: ["b", "c"], 3: ["d"]})
    publisher = Publisher(run, "compose", "fpA", {})
    publisher.publish([0, 2, 3], shas, "")
    publisher.finish()
    shas.update(_commit(run, {1: ["c"]}))  # shard 1 came late: shards 2 and 3 are published again
    publisher = Publisher(run, "compose", "fpA", {})
    assert [r.reused for r in publisher.publish([0, 1, 2, 3], shas, "")] == [True, False, False, False]
    publisher.finish()
    view, _ = read_published(run, "fpA")
    assert str(view.shards) == "0-3" and (view.rows_in, view.rows_out, view.duplicates) == (5, 4, 1)

    # a threshold change: a new compose fingerprint republishes shards 0-1; 2-3 are stale and go
    shas_b = _commit(run, {0: ["a", "x"], 1: ["c"]}, fp="fpB")
    publisher = Publisher(run, "compose", "fpB", {})
    publisher.publish([0, 1], shas_b, "")
    assert publisher.finish() == [2, 3]
    assert run.final_shards() == [0, 1]
    assert not (tmp_path / "run/publish/shard-00002.keys").exists()
    assert not read_published(run, "fpA")[0].shards
    view, _ = read_published(run, "fpB")
    assert str(view.shards) == "0-1" and (view.rows_in, view.rows_out, view.duplicates) == (3, 3, 0)
    fold, _ = L.read_ledger(run, "publish", P.PublishFold)
    assert json.loads((tmp_path / "run/publish/_ledger/summary.json").read_text())["kind"] == "publish"
    assert str(fold.published()) == "0-1" and not fold.removing
    assert remove_stale(run, [0]) == [1] and run.final_shards() == [0]


def test_an_interrupted_rewrite_never_leaves_a_matching_record(tmp_path, monkeypatch):
    """Shard 1 changes; the publisher dies while rewriting it. The next run must not keep the final files
    of shards 1-3 as they are (their records said `writing` before anything was replaced)."""
    run = RunDir(str(tmp_path / "run"))
    shas = _commit(run, {s: [f"k{s}"] for s in range(4)})
    Publisher(run, "compose", "fpA", {}).publish([0, 1, 2, 3], shas, "")
    shas.update(_commit(run, {1: ["k1", "extra"]}))
    real = run.put_atomic

    def die_on_shard_2(path, data):
        if path == run.final_path(2):
            raise KeyboardInterrupt  # the actor is killed
        real(path, data)

    monkeypatch.setattr(run, "put_atomic", die_on_shard_2)
    with pytest.raises(KeyboardInterrupt):
        Publisher(run, "compose", "fpA", {}).publish([0, 1, 2, 3], shas, "")
    monkeypatch.setattr(run, "put_atomic", real)
    reports = Publisher(run, "compose", "fpA", {}).publish([0, 1, 2, 3], shas, "")
    assert [r.reused for r in reports] == [True, True, False, False]  # 1 was finished and recorded before
    assert [r.rows_out for r in reports] == [1, 2, 1, 1]


def test_publish_batches_report_failures_per_shard(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    shas = _commit(run, {0: ["a"], 2: ["b"]})
    out = Publisher(run, "compose", "fpA", {}).publish([0, 1, 2], shas, "")
    assert isinstance(out[0], PublishReport) and isinstance(out[2], PublishReport)
    assert isinstance(out[1], P.PublishFailure) and "shard-00001" in out[1].message


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_publisher_leaves_no_folder_of_its_own_behind(tmp_path, monkeypatch, where):
    """The index's local folder (under the system temp folder, one per run directory) goes with `finish`."""
    monkeypatch.setattr(P.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    run = RunDir(str(tmp_path / "run") if where == "local" else f"memory://publisher-folder-{tmp_path.name}")
    shas = _commit(run, {s: [f"k{s}-{i}" for i in range(3)] for s in range(3)})
    publisher = Publisher(run, "compose", "fpA", {})
    publisher.publish([0, 1, 2], shas, "")
    assert list((tmp_path / "tmp").iterdir())  # the index was opened in a folder of its own
    assert publisher.finish() == []
    assert list((tmp_path / "tmp").iterdir()) == []
