"""`grit validate` across shards in bounded memory: keys repeated across final shards are found by a
k-way merge of sorted key-hash files (the publisher's `publish/shard-N.keys`), confirmed with the real
keys; a hash collision is never reported as a duplicate."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grit_pipeline.commands import validate as V
from grit_pipeline.engine.publish import key_hashes
from schemas.tables import CHUNK_TYPE, GRIT_SCHEMA, INGEST_FIELDS, PAIR_TYPE
from stages.compose import ComposeStage

_COMPOSE_SCHEMA = pa.schema([*INGEST_FIELDS, pa.field("chunks", pa.list_(CHUNK_TYPE)),
                             pa.field("pairs", pa.list_(PAIR_TYPE))])


def _final_rows(keys: list[str]) -> pa.Table:
    """Valid GrIT rows (made by the compose stage) with the given keys."""
    chunk = {"start": 0, "end": 5, "root_start": 0, "root_end": 5, "expr_start": 0, "expr_end": 5, "has_conj": False}
    pair = {"chunk": 0, "x1": 0.1, "y1": 0.1, "x2": 0.5, "y2": 0.5, "score": 0.9}
    rows = [{"key": k, "shard": 0, "url": None, "caption": "a dog", "width": 10, "height": 10, "image_ref": None,
             "chunks": [chunk], "pairs": [pair]} for k in keys]
    out = ComposeStage().process_batch(pa.Table.from_pylist(rows, schema=_COMPOSE_SCHEMA)).output
    return out.select([f.name for f in GRIT_SCHEMA]).cast(GRIT_SCHEMA)


def _write_run(root, shards: dict[int, list[str]], key_files: bool = True) -> None:
    (root / "grit").mkdir(parents=True)
    (root / "publish").mkdir()
    for shard, keys in shards.items():
        pq.write_table(_final_rows(keys), root / "grit" / f"shard-{shard:05d}.parquet")
        if key_files:  # as the publisher writes them: the shard's key hashes, sorted
            np.sort(key_hashes(keys)).astype("<u8").tofile(root / "publish" / f"shard-{shard:05d}.keys")


@pytest.fixture
def small_merge(monkeypatch):
    """A fan-in of 2 and pieces of 3 hashes: 7 shards merge in three levels."""
    monkeypatch.setattr(V, "MERGE_FAN_IN", 2)
    monkeypatch.setattr(V, "MERGE_CHUNK", 3)


def test_a_cross_shard_duplicate_is_found_through_the_key_file_merge(tmp_path, small_merge, monkeypatch):
    shards = {s: [f"k{s}-{i}" for i in range(5)] for s in range(7)}
    shards[5][2] = "k1-3"  # planted: shard 5 repeats a key of shard 1
    _write_run(tmp_path / "run", shards)
    opened = []
    real = V._key_chunks
    monkeypatch.setattr(V, "_key_chunks", lambda fs, c, i: opened.append(c.keys_remote) or real(fs, c, i))
    report = V.validate_run(str(tmp_path / "run"), workers=3)
    assert opened == [True] * 7  # every shard's hashes came from its publisher key file
    assert report.rows == 35 and len(report.files) == 7
    assert [(p.file.rsplit("/", 1)[1], p.key, p.message) for p in report.problems] == [
        ("shard-00005.parquet", "k1-3", f"duplicate key (also in {tmp_path}/run/grit/shard-00001.parquet)")]


def test_without_key_files_the_hashes_are_spilled_and_merged(tmp_path, small_merge):
    shards = {s: [f"k{s}-{i}" for i in range(4)] for s in range(5)}
    shards[4] = shards[0] + ["new"]  # a copied shard: every key of shard 0 again
    _write_run(tmp_path / "run", shards, key_files=False)
    report = V.validate_run(str(tmp_path / "run"))
    dups = sorted(p.key for p in report.problems if p.key is not None)
    assert dups == sorted(shards[0]) and all("shard-00004" in p.file for p in report.problems)


def test_a_hash_collision_is_not_a_duplicate(tmp_path, small_merge, monkeypatch):
    """Every key hashes alike: the merge finds one shared hash in every shard, the real keys one duplicate."""
    monkeypatch.setattr(V, "key_hashes", lambda keys: np.full(len(list(keys)), 7, np.uint64))
    _write_run(tmp_path / "run", {0: ["a", "b"], 1: ["c"], 2: ["d", "b"]}, key_files=False)
    report = V.validate_run(str(tmp_path / "run"))
    assert [(p.key, p.message.split(" (")[0]) for p in report.problems] == [("b", "duplicate key")]


def test_a_key_file_that_does_not_match_its_shard_is_reported_and_not_trusted(tmp_path):
    _write_run(tmp_path / "run", {0: ["a", "b"], 1: ["c"]})
    pq.write_table(_final_rows(["c", "a"]), tmp_path / "run" / "grit" / "shard-00001.parquet")  # changed by hand
    report = V.validate_run(str(tmp_path / "run"))
    messages = sorted(p.message for p in report.problems)
    assert len(messages) == 2 and messages[0].startswith("duplicate key (also in")
    assert "differ from the publisher's key file" in messages[1]


def test_a_duplicate_within_a_shard_is_reported(tmp_path):
    _write_run(tmp_path / "run", {0: ["a", "b", "a"]}, key_files=False)
    report = V.validate_run(str(tmp_path / "run"))
    assert [(p.key, p.message) for p in report.problems] == [("a", f"duplicate key (also in {tmp_path}/run/grit/shard-00000.parquet)")]
