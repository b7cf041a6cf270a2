"""`grit report` reads rows from a bounded, seeded sample of shards: the default report of a run with more
shards than `--max-shards` opens no output of an unsampled shard (counted through the filesystem, and
checked on a run whose unsampled shards are gone), the sample is deterministic and seeded, and the page,
`summary.json`, `kept_fraction.json` and `--json` say which shards were read out of how many."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import fsspec  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from fsspec.implementations.memory import MemoryFileSystem  # noqa: E402
from test_report_support import FINGERPRINTS, write_fixture_run  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from grit_pipeline.report.build import ReportOptions, build_report  # noqa: E402
from grit_pipeline.report.gallery import KeySample, sample_keys  # noqa: E402
from grit_pipeline.report.measures import CountDistribution, KeptCounts  # noqa: E402
from grit_pipeline.report.shard_sample import DEFAULT_MAX_SHARDS, ShardSample, sample_shards  # noqa: E402
from grit_pipeline.shard_ranges import ShardRanges  # noqa: E402

SHARD_FILE = re.compile(r"stages/(\w+)/\w+/shard-(\d+)\.(parquet|rejects\.parquet)$")


@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    """More shards than the default --max-shards (6 rows each, to stay cheap)."""
    return write_fixture_run(tmp_path_factory.mktemp("sample") / "run", shards=DEFAULT_MAX_SHARDS + 6,
                             rows_per_shard=6)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    return write_fixture_run(tmp_path_factory.mktemp("sample-small") / "run", shards=10, rows_per_shard=6)


def shard_files(root: Path) -> list[tuple[Path, str, int]]:
    """(path, stage, shard) of every stage output and rejects file of a run."""
    out = []
    for p in sorted((root / "stages").rglob("shard-*")):
        m = SHARD_FILE.search(p.as_posix())
        if m:
            out.append((p, m.group(1), int(m.group(2))))
    return out


# --- choosing the sample -------------------------------------------------------------------------------
def test_sample_shards_is_seeded_spread_and_independent_of_order():
    shards = list(range(10_000))
    a = sample_shards(shards, 64, seed=0)
    assert len(a) == 64 and a == sorted(a) and set(a) <= set(shards)
    assert sample_shards(list(reversed(shards)), 64, seed=0) == a
    assert sample_shards(shards, 64, seed=1) != a
    assert len({s // 1000 for s in a}) == 10  # every tenth of the run is represented, not just the first shards
    assert sample_shards(shards[:40], 64) == shards[:40]  # fewer than the limit: all of them
    assert sample_shards(shards, 0) == shards and sample_shards(shards, None) == shards


def test_sample_is_consistent_between_stages():
    """A stage whose committed shards are a subset keeps every shard of the larger stage's sample it holds."""
    ingest = list(range(1000))
    detect = [s for s in ingest if s % 3]  # a run in progress: detect has committed two thirds
    sample = ShardSample.choose({"ingest": ingest, "detect": detect}, 50, seed=7)
    assert set(sample.of("ingest")) & set(detect) <= set(sample.of("detect"))
    assert len(sample.of("detect")) == 50
    rec = sample.to_json()
    assert rec["stages"]["detect"] == {"committed": len(detect), "sampled": 50,
                                       "shards": str(ShardRanges(sample.of("detect")))}
    assert not rec["complete"] and sample.describe("detect") == f"50 of {len(detect):,} committed shards"


def test_running_aggregates_equal_one_table():
    rng = np.random.default_rng(0)
    parts = [rng.uniform(0, 1, n).astype(np.float32) for n in (5, 0, 17, 9)] + [np.array([-np.inf])]
    kept = KeptCounts([0.0, 0.5, 0.65, 0.9])
    dist = CountDistribution()
    for p in parts:
        kept.add(p)
        dist.add((p * 4).astype(np.int64) if p.size and np.isfinite(p).all() else np.array([], np.int64))
    whole = np.concatenate(parts)
    assert kept.rows == whole.size
    assert [kept.count(t) for t in kept.thresholds] == [int((whole > np.float32(t)).sum()) for t in kept.thresholds]
    values, freq = dist.arrays()
    expect = np.unique((np.concatenate(parts[:4]) * 4).astype(np.int64), return_counts=True)
    assert values.tolist() == expect[0].tolist() and freq.tolist() == expect[1].tolist()


def test_key_sample_streamed_by_shard_equals_sample_keys():
    by_shard = {s: [f"{s:05d}{i:04d}" for i in range(30)] for s in range(6)}
    by_shard[4] += by_shard[1][:10]  # keys repeated in a later shard count once, for their first shard
    ks = KeySample(8, seed=3)
    for s, keys in by_shard.items():
        ks.add(keys, s)
    population = {}
    for s, keys in by_shard.items():
        for k in keys:
            population.setdefault(k, s)
    expect = sample_keys(list(population), 8, seed=3)
    assert list(ks.chosen()) == expect
    assert ks.chosen() == {k: population[k] for k in expect}


# --- what the default report reads ---------------------------------------------------------------------
@pytest.mark.slow
def test_default_report_opens_only_sampled_shards(big_run, monkeypatch):
    """The run on an fsspec memory filesystem, every file open counted."""
    fs = fsspec.filesystem("memory")
    fs.put(str(big_run.root / "stages"), "/sampled/stages", recursive=True)
    fs.put(str(big_run.root / "run.yaml"), "/sampled/run.yaml")
    opened: list[str] = []
    real_open = MemoryFileSystem._open

    def tracking_open(self, path, *a, **kw):
        opened.append(path)
        return real_open(self, path, *a, **kw)

    monkeypatch.setattr(MemoryFileSystem, "_open", tracking_open)
    try:
        result = build_report("memory://sampled")
    finally:
        fs.rm("/sampled", recursive=True)
    read: dict[str, set[int]] = {}
    for path in opened:
        m = SHARD_FILE.search(path)
        if m:
            read.setdefault(m.group(1), set()).add(int(m.group(2)))
    sampled = {stage: set(result.sample.of(stage)) for stage in FINGERPRINTS}
    total = DEFAULT_MAX_SHARDS + 6
    assert all(len(s) == DEFAULT_MAX_SHARDS for s in sampled.values())
    assert set(read) == set(FINGERPRINTS)
    for stage, shards in read.items():
        assert shards <= sampled[stage], (stage, sorted(shards - sampled[stage]))
    assert read["detect"] == read["compose"] == sampled["detect"]  # the plots read every sampled shard
    assert result.summary["sample"]["stages"]["detect"]["committed"] == total
    assert result.kept_fraction["shards_read"] == DEFAULT_MAX_SHARDS
    assert result.kept_fraction["shards_committed"] == total


@pytest.mark.slow
def test_default_report_works_without_the_unsampled_shards(big_run, tmp_path):
    """Unsampled shards' outputs and rejects deleted: any read of one would fail the report."""
    copy = tmp_path / "run"
    shutil.copytree(big_run.root, copy)
    shards = sorted({s for _, _, s in shard_files(copy)})
    keep = set(sample_shards(shards, DEFAULT_MAX_SHARDS, seed=0))
    gone = [p for p, _, s in shard_files(copy) if s not in keep]
    assert gone
    for p in gone:
        p.unlink()

    r = CliRunner().invoke(_app(), ["report", str(copy), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    sample = out["sample"]
    assert sample["max_shards"] == DEFAULT_MAX_SHARDS and not sample["complete"]
    for stage in FINGERPRINTS:
        rec = sample["stages"][stage]
        assert rec["committed"] == len(shards) and rec["sampled"] == len(keep)
        assert set(ShardRanges.parse(rec["shards"])) == keep
    summary = json.loads((copy / "report" / "summary.json").read_text())
    assert summary["sample"] == sample
    # the funnel still counts every shard (from the summary), the kept-fraction curve only the sample
    assert summary["stages"]["detect"]["shards"] == len(shards)
    kept_rows = sum(pq.read_metadata(copy / "stages" / "detect" / FINGERPRINTS["detect"] / f"shard-{s:05d}.parquet")
                    .num_rows for s in keep)
    assert json.loads((copy / "report" / "kept_fraction.json").read_text())["rows"] == kept_rows
    html = (copy / "report" / "index.html").read_text()
    assert f"Computed over {len(keep)} of {len(shards)} shards" in html
    assert f'<tr data-stage="detect" data-sampled="{len(keep)}" data-committed="{len(shards)}">' in html
    assert all(int(k[:5]) in keep for k in out["gallery_keys"])


def _app():
    from grit_pipeline.cli import app

    return app


# --- deterministic and seeded; --all-shards ------------------------------------------------------------
def test_sample_is_deterministic_and_seeded(small_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(small_run.root, copy)
    index = copy / "report" / "index.html"
    a = build_report(str(copy), ReportOptions(sample=4, max_shards=3, seed=0))
    html_a, summary_a = index.read_text(), (copy / "report" / "summary.json").read_text()
    b = build_report(str(copy), ReportOptions(sample=4, max_shards=3, seed=0))
    assert index.read_text() == html_a and (copy / "report" / "summary.json").read_text() == summary_a
    assert b.sample == a.sample and b.gallery_keys == a.gallery_keys
    c = build_report(str(copy), ReportOptions(sample=4, max_shards=3, seed=1))
    assert c.sample.of("detect") != a.sample.of("detect")
    assert a.sample.of("detect") == sample_shards(range(10), 3, 0) and c.sample.of("detect") == sample_shards(
        range(10), 3, 1)
    assert json.loads(summary_a)["sample"] == a.sample.to_json()


@pytest.mark.parametrize("flag", [["--all-shards"], ["--max-shards", "0"]])
def test_all_shards_reads_every_shard(small_run, tmp_path, flag):
    copy = tmp_path / "run"
    shutil.copytree(small_run.root, copy)
    r = CliRunner().invoke(_app(), ["report", str(copy), "--max-shards", "3", *flag, "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    sample = json.loads(r.stdout)["sample"]
    assert sample["complete"] and sample["stages"]["detect"] == {"committed": 10, "sampled": 10, "shards": "0-9"}
    rows = sum(pq.read_metadata(p).num_rows for p, stage, _ in shard_files(copy)
               if stage == "detect" and p.name.endswith(".parquet") and "rejects" not in p.name)
    assert json.loads((copy / "report" / "kept_fraction.json").read_text())["rows"] == rows
    assert "Computed over all committed shards." in (copy / "report" / "index.html").read_text()
