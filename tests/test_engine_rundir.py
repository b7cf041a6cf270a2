"""The run directory: atomic per-shard commits with `_done` markers, cleanup of what a crash left,
byte-deterministic Parquet, and the final `grit/` shards (no Ray)."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grit_pipeline.engine.publish import KeyIndex, Publisher, key_hashes, remove_stale
from grit_pipeline.rundir.store import RunDir, ShardFiles, parquet_bytes, sha256
from schemas.tables import GRIT_SCHEMA, REJECT_SCHEMA, SELECT_SCHEMA


def _pairs(keys: list[str]) -> pa.Table:
    pairs = [[{"chunk": 0, "x1": 0.1, "y1": 0.2, "x2": 0.5, "y2": 0.6, "score": 0.9}] for _ in keys]
    return pa.Table.from_pydict({"key": keys, "pairs": pairs}, schema=SELECT_SCHEMA)


def _rejects(keys: list[str]) -> pa.Table:
    return pa.Table.from_pydict({"key": keys, "stage": ["select"] * len(keys), "reason": ["no_box"] * len(keys),
                                 "detail": [""] * len(keys)}, schema=REJECT_SCHEMA)


def _files(keys, rejected=()) -> ShardFiles:
    return ShardFiles(_pairs(list(keys)), _rejects(list(rejected)),
                      {"rows_in": len(keys) + len(rejected), "rows_out": len(keys)})


def test_commit_writes_files_then_marker(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    marker = run.commit_shard("select", "fp1", 7, _files(["a", "b"], ["c"]))
    base = tmp_path / "run" / "stages" / "select" / "fp1"
    assert sorted(p.name for p in base.iterdir()) == [
        "_done", "shard-00007.parquet", "shard-00007.rejects.parquet", "shard-00007.stats.json"]
    assert run.committed("select", "fp1") == {7}
    assert run.markers("select", "fp1", [7])[7] == marker
    data = (base / "shard-00007.parquet").read_bytes()
    assert marker["files"]["shard-00007.parquet"] == {"size": len(data), "sha256": sha256(data)}
    assert marker["rows"] == 2 and marker["rejects"] == 1
    assert run.read_table("select", "fp1", 7)["key"].to_pylist() == ["a", "b"]
    assert not os.listdir(tmp_path / "run" / "_tmp")  # every temporary file was moved into place


def test_clean_uncommitted_removes_only_unmarked_shards(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.commit_shard("select", "fp1", 0, _files(["a"]))
    base = tmp_path / "run" / "stages" / "select" / "fp1"
    committed = {p.name: p.stat().st_mtime_ns for p in base.iterdir() if p.is_file()}
    # what a crash between writing files and the marker leaves behind
    run.put_atomic(run.shard_path("select", "fp1", 1), parquet_bytes(_pairs(["x"])))
    run.put_atomic(run.shard_path("select", "fp1", 1, "stats.json"), b"{}")
    (tmp_path / "run" / "_tmp" / "shard-00002.parquet.123").write_bytes(b"half")
    assert run.committed("select", "fp1") == {0}

    removed = run.clean_uncommitted("select", "fp1")
    run.clean_tmp()
    assert sorted(os.path.basename(p) for p in removed) == ["shard-00001.parquet", "shard-00001.stats.json"]
    assert {p.name: p.stat().st_mtime_ns for p in base.iterdir() if p.is_file()} == committed
    assert not (tmp_path / "run" / "_tmp").exists()


def test_parquet_bytes_are_deterministic_across_processes(tmp_path):
    table = _pairs(["k1", "k2", "k3"])
    here = parquet_bytes(table)
    assert parquet_bytes(_pairs(["k1", "k2", "k3"])) == here
    code = ("import sys; sys.path.insert(0, 'tests'); from test_engine_rundir import _pairs; "
            "from grit_pipeline.rundir.store import parquet_bytes; "
            "sys.stdout.buffer.write(parquet_bytes(_pairs(['k1', 'k2', 'k3'])))")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True,
                           cwd=os.path.dirname(os.path.dirname(__file__))).stdout
    assert there == here
    assert pq.read_table(pa.BufferReader(here)).equals(table)


def _grit_rows(keys: list[str]) -> pa.Table:
    return pa.Table.from_pylist([{"key": k, "url": None, "caption": "a dog", "width": 4, "height": 4,
                                  "noun_chunks": [[0, 5, 0.1, 0.1, 0.5, 0.5, 0.9]],
                                  "ref_exps": [[0, 5, 0.1, 0.1, 0.5, 0.5, 0.9]],
                                  "grounded_caption": "g", "markdown_caption": "m"} for k in keys], schema=GRIT_SCHEMA)


def _publish_all(run: RunDir, fp: str, shards: list[int]) -> list:
    publisher = Publisher(run, "compose", fp, {b"grit_pipeline": b'{"v": 1}'})
    return [publisher.publish(s) for s in shards]


def test_publisher_keeps_the_first_of_duplicate_keys_by_shard_order(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    for shard, keys in ((0, ["a", "b"]), (1, []), (2, ["c", "a", "d"]), (3, ["b", "c", "e"])):
        run.commit_shard("compose", "fpA", shard, ShardFiles(_grit_rows(keys), _rejects([]), {}))
    reports = _publish_all(run, "fpA", [0, 1, 2, 3])
    assert [(r.rows_in, r.rows_out, r.duplicates, r.reused) for r in reports] == [
        (2, 2, 0, False), (0, 0, 0, False), (3, 2, 1, False), (3, 1, 2, False)]
    final = {s: pq.read_table(run.final_path(s))["key"].to_pylist() for s in range(4)}
    assert final == {0: ["a", "b"], 1: [], 2: ["c", "d"], 3: ["e"]}
    rejects = pq.read_table(run.path("publish", "shard-00003.rejects.parquet")).to_pylist()
    assert rejects == [
        {"key": "b", "stage": "publish", "reason": "duplicate_key", "detail": "key also in shard-00000, which is kept"},
        {"key": "c", "stage": "publish", "reason": "duplicate_key", "detail": "key also in shard-00002, which is kept"}]
    assert pq.read_schema(run.final_path(0)).metadata[b"grit_pipeline"] == b'{"v": 1}'
    # the same inputs again: every final file is kept as it is
    before = {s: (tmp_path / f"run/grit/shard-{s:05d}.parquet").stat().st_mtime_ns for s in range(4)}
    assert all(r.reused for r in _publish_all(run, "fpA", [0, 1, 2, 3]))
    assert before == {s: (tmp_path / f"run/grit/shard-{s:05d}.parquet").stat().st_mtime_ns for s in range(4)}


def test_a_lower_shard_published_late_republishes_the_shards_above_it(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    for shard, keys in ((0, ["a"]), (2, ["b", "c"]), (3, ["d"])):
        run.commit_shard("compose", "fpA", shard, ShardFiles(_grit_rows(keys), _rejects([]), {}))
    _publish_all(run, "fpA", [0, 2, 3])
    run.commit_shard("compose", "fpA", 1, ShardFiles(_grit_rows(["c"]), _rejects([]), {}))  # shard 1 came late
    reports = _publish_all(run, "fpA", [0, 1, 2, 3])
    assert [r.reused for r in reports] == [True, False, False, False]
    assert pq.read_table(run.final_path(2))["key"].to_pylist() == ["b"]  # c now belongs to shard 1
    assert remove_stale(run, [0, 1, 2]) == [3]
    assert run.final_shards() == [0, 1, 2]
    assert not (tmp_path / "run/publish/shard-00003.keys").exists()
    assert not (tmp_path / "run/publish/shard-00003.rejects.parquet").exists()


def test_publishing_out_of_order_is_refused(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    for shard in (0, 1):
        run.commit_shard("compose", "fpA", shard, ShardFiles(_grit_rows([f"k{shard}"]), _rejects([]), {}))
    publisher = Publisher(run, "compose", "fpA", {})
    publisher.publish(1)
    with pytest.raises(ValueError, match="in order"):
        publisher.publish(0)


def test_key_index_lookups_after_many_appends():
    index = KeyIndex()
    for shard in range(30):
        index.add(key_hashes([f"{shard}-{i}" for i in range(5000)]), shard)
    got = index.lookup(key_hashes(["0-0", "29-4999", "17-123", "nope"]))
    assert got.tolist() == [0, 29, 17, -1] and len(index) == 150_000


def test_object_store_semantics_on_memory_fs():
    run = RunDir("memory://grit-test-run")
    try:
        run.commit_shard("select", "fp", 3, _files(["a"], ["b"]))
        assert run.committed("select", "fp") == {3}
        assert run.read_table("select", "fp", 3)["key"].to_pylist() == ["a"]
        run.put_atomic(run.shard_path("select", "fp", 4), b"partial")
        assert run.clean_uncommitted("select", "fp") == [run.shard_path("select", "fp", 4)]
    finally:
        run.fs.rm(run.root, recursive=True)


@pytest.mark.parametrize("suffix", ["parquet", "rejects.parquet"])
def test_committed_files_match_their_marker(tmp_path, suffix):
    run = RunDir(str(tmp_path))
    marker = run.commit_shard("select", "fp", 0, _files(["a", "b"], ["c"]))
    data = run.read_bytes(run.shard_path("select", "fp", 0, suffix))
    assert marker["files"][f"shard-00000.{suffix}"]["sha256"] == sha256(data)
