"""Ledgers (`grit_pipeline.rundir.ledger`) and shard ranges (`grit_pipeline.shard_ranges`): what a run
committed, folded into a few objects; a reader and a later writer see every record exactly once."""

from __future__ import annotations

import json
import random

import pytest

from grit_pipeline.rundir import ledger as L
from grit_pipeline.rundir.store import RunDir
from grit_pipeline.shard_ranges import ShardRanges


def test_shard_ranges_match_a_plain_set():
    rng = random.Random(0)
    ranges, plain = ShardRanges(), set()
    for _ in range(3000):
        v = rng.randrange(500)
        if rng.random() < 0.8:
            ranges.add(v)
            plain.add(v)
        else:
            ranges.discard(v)
            plain.discard(v)
        assert len(ranges) == len(plain)
    assert list(ranges) == sorted(plain)
    assert all((v in ranges) == (v in plain) for v in range(-2, 505))
    assert ShardRanges.parse(str(ranges)) == ranges


def test_shard_ranges_text():
    r = ShardRanges([0, 1, 2, 5, 7, 8])
    assert str(r) == "0-2,5,7-8"
    r.add_range(3, 6)
    assert str(r) == "0-8" and r.ranges() == [(0, 8)] and len(r) == 9
    with pytest.raises(ValueError, match="bad shard selection"):
        ShardRanges.parse("0-x")
    with pytest.raises(ValueError, match="empty shard range"):
        ShardRanges.parse("5-3")
    assert not ShardRanges.parse("")


def _commit(shard, rows=10, t=1_000_000.0, reasons=None):
    reasons = reasons or {"no_box": 2}
    return {"shard": shard, "time": t, "rows_in": rows, "rows": rows - sum(reasons.values()),
            "reject_reasons": reasons, "counters": {"c": 1}, "seconds": 0.5, "peak_rss_mb": 100.0 + shard}


def test_writer_seals_folds_and_a_reader_sees_every_record_once(tmp_path, monkeypatch):
    monkeypatch.setattr(L, "SEGMENT_RECORDS", 4)
    rd = RunDir(str(tmp_path))
    w = L.LedgerWriter(rd, "stages/x/fp")
    w.append(_commit(s) for s in range(6))
    assert w.flush() == 3  # seg 0 sealed, seg 1 open, summary
    w.append([_commit(6), {"shard": 9, "failed": "boom", "error_type": "ValueError"}])
    w.flush()
    names = sorted(p.name for p in (tmp_path / "stages/x/fp/_ledger").iterdir())
    assert names == ["seg-000000.jsonl", "seg-000001.jsonl", "summary.json"]
    assert json.loads((tmp_path / "stages/x/fp/_ledger/summary.json").read_text())["through"] == 1  # both full: sealed
    fold, found = L.read_ledger(rd, "stages/x/fp")
    assert found and str(fold.committed) == "0-6" and str(fold.failed) == "9"
    assert fold.rows_in == 70 and fold.rows_out == 56 and fold.rejects == {"no_box": 14}
    assert fold.counters == {"c": 7} and fold.peak_rss_mb == 106.0 and fold.records == 8
    # a later writer continues the open segment; the failed shard commits and stops counting as failed
    w2 = L.LedgerWriter(rd, "stages/x/fp")
    assert w2.position == (2, 0) and str(w2.fold.committed) == "0-6"
    w2.append([_commit(9), _commit(10)])
    w2.flush()
    fold, _ = L.read_ledger(rd, "stages/x/fp")
    assert str(fold.committed) == "0-6,9-10" and not fold.failed and fold.records == 10


def test_reader_refresh_reads_only_the_open_segment(tmp_path, monkeypatch):
    monkeypatch.setattr(L, "SEGMENT_RECORDS", 3)
    rd = RunDir(str(tmp_path))
    w = L.LedgerWriter(rd, "l")
    w.append(_commit(s) for s in range(7))
    w.flush()
    reader = L.LedgerReader(rd, "l")
    assert len(reader.read().committed) == 7
    reads = []
    real = reader.seg.read_segment
    monkeypatch.setattr(reader.seg, "read_segment", lambda n: reads.append(n) or real(n))
    w.append([_commit(7)])
    w.flush()
    assert len(reader.read().committed) == 8
    assert reads == [2]  # segments 0 and 1 are sealed and folded: never read again


def test_a_commit_is_never_counted_twice(tmp_path):
    rd = RunDir(str(tmp_path))
    w = L.LedgerWriter(rd, "l")
    w.append([_commit(1), _commit(1)])
    w.flush()
    fold, _ = L.read_ledger(rd, "l")
    assert fold.rows_in == 10 and len(fold.committed) == 1


def test_missing_ledger_and_torn_line(tmp_path):
    rd = RunDir(str(tmp_path))
    fold, found = L.read_ledger(rd, "nothing")
    assert not found and not fold.committed
    w = L.LedgerWriter(rd, "l")
    w.append([_commit(0), _commit(1)])
    w.flush()
    seg = tmp_path / "l/_ledger/seg-000000.jsonl"
    seg.write_text(seg.read_text() + '{"shard": 2, "ti')
    fold, _ = L.read_ledger(rd, "l")
    assert str(fold.committed) == "0-1"


def test_recent_throughput_by_minute():
    f = L.StageFold()
    for i in range(10):
        f.add(_commit(i, rows=5, t=6000.0 + 30 * i))  # one commit every 30 s
    assert f.recent(now=6300.0, window_s=120) == (4, 20)  # minutes 103-104: t = 6180 ... 6270
    assert f.recent(now=6300.0, window_s=3600) == (10, 50)


def test_shard_ranges_difference_matches_sets():
    rng = random.Random(1)
    for _ in range(200):
        a = {rng.randrange(80) for _ in range(rng.randrange(60))}
        b = {rng.randrange(80) for _ in range(rng.randrange(60))}
        diff = ShardRanges(a).difference(ShardRanges(b))
        assert list(diff) == sorted(a - b) and len(diff) == len(a - b)
