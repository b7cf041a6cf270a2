"""`grit calibrate`: on a synthetic GRIT-20M release whose replay detector scores every pair by a known
monotone map of its GLIP score, plus distractor pairs below the mapped 0.65 (`grit_pipeline.assets.
grit_calibration`), it must recover the mapped 0.65 within its bootstrap interval; its per-threshold counts
must be what `select` keeps at that threshold; rows that differ from the release are counted; the result
does not depend on how the rows are split into shards.

The run directories here are committed through the engine's RunDir from the real ingest (grit20m reader)
and detect (replay backend) stages; the chunk spans are the fixture's own (the Ray test at the end runs the
whole pipeline with spaCy instead)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml
from typer.testing import CliRunner

from grit_pipeline.assets.grit_calibration import write_calibration_fixture
from grit_pipeline.commands.calibrate import (
    REPORT_JSON,
    REPORT_PNG,
    CalibrateOptions,
    CalibrationError,
    calibrate,
    match_pairs,
    poisson_weights,
)
from grit_pipeline.engine.stats import shard_stats
from grit_pipeline.rundir.store import RunDir, ShardFiles
from schemas.tables import CHUNKS_SCHEMA, REJECT_SCHEMA
from stages.detect import DetectConfig, DetectStage
from stages.ingest import IngestConfig, IngestStage
from stages.select import SelectConfig, SelectStage

FINGERPRINTS = {"ingest": "fa00000000000001", "chunks": "fb00000000000002", "detect": "fc00000000000003",
                "select": "fd00000000000004", "compose": "fe00000000000005"}
FAST = CalibrateOptions(step=0.001, nms_ious=(0.7, 1.0), replicates=100)


def _chunk(s: int, e: int) -> dict:
    return {"start": s, "end": e, "root_start": s, "root_end": e, "expr_start": s, "expr_end": e, "has_conj": False}


def _commit(root: Path, stage: str, shard: int, out: pa.Table, rejects: pa.Table, rows_in: int) -> None:
    st = shard_stats(stage, shard, FINGERPRINTS[stage], rows_in, out, rejects)
    RunDir(str(root)).commit_shard(stage, FINGERPRINTS[stage], shard, ShardFiles(out, rejects, st.to_json()))


def build_run(root: Path, fixture, *, rows_per_shard: int = 150, differ: set[str] = frozenset(),
              image_failed: set[str] = frozenset(), drop_released: bool = False,
              release: Path | None = None) -> Path:
    """Commit ingest (the fixture's release read as GRIT-20M metadata), chunks (every chunk span of each
    row; `differ`: the first released span left out) and detect (the replay detector) for every shard;
    `image_failed` rows become detect rejects for their image; `drop_released`: no src_noun_chunks."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "run.yaml").write_text(yaml.safe_dump({
        "ingest": {"format": "grit20m"}, "detect": {"backend": "replay"},
        "select": {"min_score": 0.65, "nms_iou": 0.7, "nms_scope": "pair"}, "fingerprints": FINGERPRINTS}))
    ingest = IngestStage(IngestConfig(format="grit20m", rows_per_shard=rows_per_shard))
    detect = DetectStage(DetectConfig(backend="replay", replay_path=str(fixture.replay), check_images=False,
                                      floor=0.05))
    for src in ingest.discover(str(release or fixture.release)):
        raw = ingest.read(src)
        result = ingest.process_batch(raw)
        out = result.output
        if drop_released:
            out = out.drop_columns(["src_noun_chunks"])
        _commit(root, "ingest", src.index, out, result.rejects, raw.num_rows)
        keys = out["key"].to_pylist()
        released = dict(zip(keys, result.output["src_noun_chunks"].to_pylist(), strict=True))
        chunk_lists = []
        for key in keys:
            spans = list(fixture.spans.get(key, [(0, 1)]))
            if key in differ:
                spans.remove(tuple(int(v) for v in released[key][0][:2]))
            chunk_lists.append([_chunk(s, e) for s, e in spans])
        chunks = pa.Table.from_arrays([out["key"], pa.array(chunk_lists, CHUNKS_SCHEMA.field("chunks").type)],
                                      schema=CHUNKS_SCHEMA)
        _commit(root, "chunks", src.index, chunks, REJECT_SCHEMA.empty_table(), out.num_rows)
        joined = pa.table({"key": out["key"], "caption": out["caption"], "chunks": chunks["chunks"]})
        found = detect.process_batch(joined)
        det, rej = found.output, found.rejects
        if image_failed:
            failed = pc.is_in(det["key"], value_set=pa.array(sorted(image_failed)))
            gone = det.filter(failed)["key"].to_pylist()
            det = det.filter(pc.invert(failed))
            rej = pa.concat_tables([rej, pa.table({"key": gone, "stage": ["detect"] * len(gone),
                                                   "reason": ["image_decode_error"] * len(gone),
                                                   "detail": ["truncated"] * len(gone)}, schema=REJECT_SCHEMA)])
        _commit(root, "detect", src.index, det, rej, chunks.num_rows)
    return root


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return write_calibration_fixture(tmp_path_factory.mktemp("grit") / "release", rows=400, seed=1)


@pytest.fixture(scope="module")
def report(fixture, tmp_path_factory):
    run = build_run(tmp_path_factory.mktemp("runs") / "run", fixture)
    return run, calibrate(str(run), FAST)


# --- pieces -------------------------------------------------------------------------------------------------


def test_match_pairs_one_to_one_by_span_and_iou():
    released = [((0, 5), (0.1, 0.1, 0.5, 0.5)), ((0, 5), (0.6, 0.6, 0.9, 0.9)), ((6, 9), (0.1, 0.1, 0.5, 0.5))]
    kept = [(0.9, (0, 5), (0.12, 0.1, 0.5, 0.5)),  # the first released box
            (0.8, (0, 5), (0.1, 0.12, 0.5, 0.5)),  # also overlaps it, but it is taken: no match
            (0.7, (6, 9), (0.6, 0.6, 0.9, 0.9)),  # right box of another span: no match
            (0.6, (0, 5), (0.6, 0.6, 0.88, 0.9))]  # the second released box
    assert match_pairs(kept, released, 0.5) == [True, False, False, True]
    assert match_pairs(kept[::-1], released, 0.5) == [True, False, False, True][::-1]  # by score, not order


def test_bootstrap_weights_depend_on_the_key_alone():
    keys = [f"k{i}" for i in range(2000)]
    w = poisson_weights(keys, 50, seed=3)
    assert w.shape == (50, 2000) and abs(w.mean() - 1) < 0.05 and abs(w.var() - 1) < 0.1  # Poisson(1)
    assert np.array_equal(poisson_weights(keys[::-1], 50, seed=3), w[:, ::-1])
    assert not np.array_equal(poisson_weights(keys, 50, seed=4), w)


# --- the calibration ----------------------------------------------------------------------------------------


def test_recovers_the_mapped_threshold_within_its_interval(fixture, report):
    _, rep = report
    rec = rep["recommended"]
    assert fixture.mapped_threshold == pytest.approx(0.4225)
    lo, hi = rec["interval"]
    assert lo <= fixture.mapped_threshold <= hi
    assert hi - lo < 0.02
    assert rec["f1"] > 0.99
    assert rep["rows"]["compared"] == fixture.rows and rep["rows"]["released_pairs"] == fixture.released_pairs
    # the paper's 0.65 on this detector's scale keeps far fewer of the released pairs
    assert rep["at_paper_threshold"]["recall"] < 0.7
    assert rep["recommended"]["nms_iou"] == 0.7  # NMS changes nothing here: ties go to the run's own


@pytest.mark.parametrize("name", ["identity", "affine"])
def test_recovers_other_monotone_maps(name, tmp_path):
    mapped = {"identity": lambda s: s, "affine": lambda s: 0.1 + 0.5 * s}[name]
    fx = write_calibration_fixture(tmp_path / "release", rows=300, seed=2, mapped=mapped)
    rep = calibrate(str(build_run(tmp_path / "run", fx)), FAST)
    lo, hi = rep["recommended"]["interval"]
    assert lo <= fx.mapped_threshold <= hi, (rep["recommended"], fx.mapped_threshold)


def test_counts_are_what_select_keeps_at_each_threshold(fixture, report):
    run, rep = report
    rundir = RunDir(str(run))
    thresholds = rep["grid"]["thresholds"]
    row = rep["by_nms_iou"]["0.7"]
    for t in (0.2, 0.35, 0.4225, 0.5, 0.8):
        i = int(np.searchsorted(np.float32(thresholds), np.float32(t), side="right")) - 1
        select = SelectStage(SelectConfig(min_score=thresholds[i], nms_iou=0.7))
        pairs = captions = matched = 0
        for shard in sorted(rundir.committed("detect", FINGERPRINTS["detect"])):
            det = rundir.read_table("detect", FINGERPRINTS["detect"], shard)
            ch = rundir.read_table("chunks", FINGERPRINTS["chunks"], shard)
            idx = pc.index_in(det["key"], value_set=ch["key"])
            out = select.process_batch(pa.table({"key": det["key"], "candidates": det["candidates"],
                                                 "chunks": ch["chunks"].take(idx)})).output
            pairs += sum(len(p) for p in out["pairs"].to_pylist())
            captions += out.num_rows
            ing = rundir.read_table("ingest", FINGERPRINTS["ingest"], shard, columns=["key", "src_noun_chunks"])
            released = dict(zip(ing["key"].to_pylist(), ing["src_noun_chunks"].to_pylist(), strict=True))
            spans = dict(zip(ch["key"].to_pylist(), ch["chunks"].to_pylist(), strict=True))
            for key, plist in zip(out["key"].to_pylist(), out["pairs"].to_pylist(), strict=True):
                kept = [(p["score"], (spans[key][p["chunk"]]["start"], spans[key][p["chunk"]]["end"]),
                         (p["x1"], p["y1"], p["x2"], p["y2"])) for p in plist]
                rel = [((int(e[0]), int(e[1])), tuple(e[2:6])) for e in released[key]]
                matched += sum(match_pairs(kept, rel, 0.5))
        assert (row["pairs_kept"][i], row["captions_kept"][i], row["pairs_matched"][i]) == (pairs, captions, matched)
        assert row["precision"][i] == pytest.approx(matched / pairs if pairs else 1.0, abs=1e-6)
        assert row["recall"][i] == pytest.approx(matched / fixture.released_pairs, abs=1e-6)


def test_the_shard_split_changes_nothing(fixture, report, tmp_path):
    """Counts are summed shard by shard and bootstrap weights come from keys: one shard or five give the
    same report."""
    _, rep = report
    other = calibrate(str(build_run(tmp_path / "run", fixture, rows_per_shard=1000)), FAST)
    assert rep["shards"]["compared"] > 1 and other["shards"]["compared"] == 1
    for name in ("recommended", "by_nms_iou", "rows", "at_paper_threshold"):
        assert other[name] == rep[name], name


def test_rows_that_differ_are_counted_not_dropped(fixture, tmp_path):
    keys = sorted(fixture.spans)
    extra = tmp_path / "release.jsonl"  # the release plus a row whose noun_chunks list is empty
    empty = {"key": "900000000", "url": "https://example.com/x.jpg", "caption": "a dog", "width": 1, "height": 1,
             "noun_chunks": [], "ref_exps": [], "id": 1, "clip_similarity_vitb32": 0.3}
    extra.write_text(fixture.release.read_text() + json.dumps(empty) + "\n")
    run = build_run(tmp_path / "run", fixture, differ=set(keys[:7]), image_failed=set(keys[7:10]), release=extra)
    rep = calibrate(str(run), FAST)
    rows = rep["rows"]
    assert (rows["seen"], rows["chunks_differ"], rows["not_detected"], rows["no_released_pairs"]) == \
        (fixture.rows + 1, 7, {"image_decode_error": 3}, 1)
    assert rows["compared"] == fixture.rows - 10


def test_release_metadata_joined_on_id(fixture, report, tmp_path):
    """Without the passthrough column, the same figures come from the metadata itself (joined on id); a
    row whose caption is not the release's is counted."""
    _, rep = report
    run = build_run(tmp_path / "run", fixture, drop_released=True)
    with pytest.raises(CalibrationError, match="--release"):
        calibrate(str(run), FAST)
    joined = calibrate(str(run), CalibrateOptions(**{**FAST.__dict__, "release": str(fixture.release)}))
    assert joined["join"] == "id"
    for name in ("recommended", "by_nms_iou", "rows"):
        assert joined[name] == rep[name], name
    lines = fixture.release.read_text().splitlines()
    first = json.loads(lines[0])
    first["caption"] = first["caption"].upper()
    changed = tmp_path / "changed.jsonl"
    changed.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    other = calibrate(str(run), CalibrateOptions(**{**FAST.__dict__, "release": str(changed)}))
    assert other["rows"]["caption_differs"] == 1 and other["rows"]["compared"] == fixture.rows - 1


# --- the command ----------------------------------------------------------------------------------------------


def test_cli_prints_writes_json_and_png(report, tmp_path):
    from grit_pipeline.cli import app

    run, rep = report
    result = CliRunner().invoke(app, ["calibrate", str(run), "--nms-iou", "0.7,1.0", "--replicates", "100"])
    assert result.exit_code == 0, result.output
    assert "recommended: select.min_score=" in result.output and "chunks differ" in result.output
    written = json.loads((run / REPORT_JSON).read_text())
    assert written["recommended"] == rep["recommended"]
    assert (run / REPORT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    as_json = CliRunner().invoke(app, ["calibrate", str(run), "--nms-iou", "0.7", "--replicates", "20",
                                       "--json", "--no-write"])
    assert as_json.exit_code == 0 and json.loads(as_json.output)["recommended"]["nms_iou"] == 0.7
    bad = CliRunner().invoke(app, ["calibrate", str(tmp_path / "nowhere")])
    assert bad.exit_code == 2 and "not a run directory" in bad.output
    worse = CliRunner().invoke(app, ["calibrate", str(run), "--nms-iou", "x"])
    assert worse.exit_code == 2


@pytest.mark.ray
def test_a_real_run_over_release_rows_then_calibrate(ray_local, tmp_path):
    """The whole pipeline (spaCy chunks, the replay detector, no images) over the release's rows, then
    `grit calibrate` on that run: the mapped 0.65 is within the interval."""
    from grit_pipeline.api import run_pipeline

    fx = write_calibration_fixture(tmp_path / "release", rows=300, seed=5)
    out = tmp_path / "run"
    result = run_pipeline(None, input=str(fx.release), output=str(out), overrides=[
        "ingest.format=grit20m", "ingest.rows_per_shard=100", "detect.backend=replay",
        f"detect.replay_path={fx.replay}", "detect.check_images=false", "detect.floor=0.05",
        "run.progress=false"], to_stage="detect")
    assert result.ok
    rep = calibrate(str(out), FAST)
    lo, hi = rep["recommended"]["interval"]
    assert lo <= fx.mapped_threshold <= hi
    assert rep["rows"]["compared"] + rep["rows"]["chunks_differ"] == fx.rows
    assert rep["rows"]["compared"] >= 0.95 * fx.rows and not math.isnan(rep["recommended"]["f1"])
