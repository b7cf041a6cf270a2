"""`grit inspect`: rows and rejects in the terminal, `--png` box drawing checked pixel by pixel, and
selective reads (only the shard, stages and columns shown) on an fsspec filesystem other than local disk."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import fsspec  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import typer  # noqa: E402
import yaml  # noqa: E402
from fsspec.implementations.memory import MemoryFileSystem  # noqa: E402
from PIL import Image, ImageColor  # noqa: E402
from test_report_support import FINGERPRINTS, write_fixture_run, write_one_row_run  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from grit_pipeline.report.boxes import chunk_color  # noqa: E402
from grit_pipeline.report.inspect_rows import rows_by_key  # noqa: E402
from grit_pipeline.report.run_files import RunFiles  # noqa: E402


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    from grit_pipeline.cli import app  # the real `grit` CLI, which registers report/inspect

    return app


def invoke(app, *args: str):
    result = CliRunner().invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "160"})
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_fixture_run(tmp_path_factory.mktemp("inspect") / "run", shards=3, rows_per_shard=8)


# --- --png ---------------------------------------------------------------------------------------------
W, H, BG = 300, 200, (128, 128, 128)
BOXES = [(0.1, 0.2, 0.4, 0.7), (0.55, 0.1, 0.9, 0.55)]


@pytest.fixture(scope="module")
def one_row(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("png") / "run"
    write_one_row_run(root, (W, H), BG, "a dog and a cat", [(0, 5), (10, 15)], BOXES)
    return root


def _final_boxes(root: Path) -> list[tuple[list[float], int]]:
    """(corners, chunk index) of each box in the compose output, read straight from its Parquet file."""
    row = pq.read_table(root / "stages" / "compose" / FINGERPRINTS["compose"] / "shard-00000.parquet").to_pylist()[0]
    starts = {0: 0, 10: 1}
    return [(e[2:6], starts[int(e[0])]) for e in row["noun_chunks"]]


def _pixels(box, w=W, h=H):
    return round(box[0] * w), round(box[1] * h), round(box[2] * w) - 1, round(box[3] * h) - 1


def test_png_outlines_exactly_the_rows_boxes(app, one_row, tmp_path):
    out = tmp_path / "boxes.png"
    r = invoke(app, "inspect", str(one_row), "--stage", "compose", "--key", "000000000", "--png", str(out),
               "--no-labels")
    assert r.exit_code == 0, r.output
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert img.shape == (H, W, 3)
    changed = (img != BG).any(axis=2)

    boxes = _final_boxes(one_row)
    assert len(boxes) == 2
    expected = np.zeros_like(changed)
    colours = set()
    for corners, chunk in boxes:
        left, top, right, bottom = _pixels(corners)
        mid_y = (top + bottom) // 2
        lw = int(changed[mid_y, left:right].argmin())  # thickness of the left edge, measured
        assert 2 <= lw < 10
        band = np.zeros_like(changed)
        band[top:bottom + 1, left:right + 1] = True
        band[top + lw:bottom + 1 - lw, left + lw:right + 1 - lw] = False
        expected |= band
        colour = tuple(ImageColor.getrgb(chunk_color(chunk)))
        assert {tuple(p) for p in img[band]} == {colour}  # the whole outline in the chunk's colour
        colours.add(colour)
        assert not changed[mid_y, left - 1] and not changed[mid_y, right + 1]  # nothing outside the box
        assert not changed[bottom + 1, (left + right) // 2] and not changed[(top + bottom) // 2, (left + right) // 2]
    assert len(colours) == 2
    assert np.array_equal(changed, expected)  # and nothing else was drawn


def test_png_with_labels_keeps_the_edges(app, one_row, tmp_path):
    out = tmp_path / "labelled.png"
    r = invoke(app, "inspect", str(one_row), "--stage", "compose", "--key", "000000000", "--png", str(out))
    assert r.exit_code == 0, r.output
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    plain = (img == BG).all(axis=2)
    assert not plain.all()
    for corners, chunk in _final_boxes(one_row):
        left, top, right, bottom = _pixels(corners)
        colour = list(ImageColor.getrgb(chunk_color(chunk)))
        mid_x, mid_y = (left + right) // 2, (top + bottom) // 2
        for y, x in ((mid_y, left), (mid_y, right), (bottom, mid_x)):
            assert img[y, x].tolist() == colour
        assert plain[mid_y, mid_x]


def test_png_of_detect_candidates_and_errors(app, one_row, run, tmp_path):
    out = tmp_path / "detect.png"
    r = invoke(app, "inspect", str(one_row), "--stage", "detect", "--key", "000000000", "--png", str(out), "--no-labels")
    assert r.exit_code == 0, r.output
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    left, top, right, bottom = _pixels(BOXES[0])
    assert img[(top + bottom) // 2, left].tolist() == list(ImageColor.getrgb(chunk_color(0)))

    r = invoke(app, "inspect", str(one_row), "--stage", "chunks", "--key", "000000000", "--png", str(out))
    assert r.exit_code == 2 and "boxes" in r.output
    # a row select dropped has no final boxes: the error says where it went
    weak = run.keys_by_shard[0][4]
    r = invoke(app, "inspect", str(run.root), "--stage", "compose", "--key", weak, "--png", str(out))
    assert r.exit_code == 2 and "no_box" in r.output


# --- terminal output -----------------------------------------------------------------------------------
def test_inspect_key_prints_the_row(app, run):
    key = run.keys_by_shard[1][0]
    r = invoke(app, "inspect", str(run.root), "--stage", "compose", "--key", key)
    assert r.exit_code == 0, r.output
    assert key in r.output and "shard 1" in r.output
    assert "a red car next to a tree" in r.output
    assert "<grounding>" in r.output and "patch_index_" in r.output


def test_inspect_shows_where_a_row_was_dropped(app, run):
    dropped_at_select = run.keys_by_shard[2][4]
    r = invoke(app, "inspect", str(run.root), "--stage", "select", "--key", dropped_at_select)
    assert r.exit_code == 0, r.output
    assert "at select: no_box" in r.output
    dropped_at_chunks = run.keys_by_shard[2][2]
    r = invoke(app, "inspect", str(run.root), "--stage", "compose", "--key", dropped_at_chunks)
    assert "at chunks: unsafe_caption" in r.output


def test_inspect_prints_markup_like_captions_literally(app, run):
    # "two cats & a "sofa" [1]" is row 2 of the caption cycle; rich markup would swallow "[1]"
    key = next(k for s, keys in run.keys_by_shard.items() for i, k in enumerate(keys) if (i + s) % 4 == 2 and i > 4)
    r = invoke(app, "inspect", str(run.root), "--stage", "chunks", "--key", key)
    assert 'two cats & a "sofa" [1]' in r.output


def test_inspect_detect_shows_each_candidates_fate_under_the_runs_select_rule(app, run):
    key = run.keys_by_shard[0][0]  # "a dog in a field of flowers": per chunk a box, a jittered copy, a weak one
    traces = rows_by_key(RunFiles.open(str(run.root)), "detect", [key])
    fates = traces[0].row["select_fates"]
    statuses = [f.status for f in fates]
    assert statuses.count("kept") == 3 and "below_min_score" in statuses and "nms" in statuses
    r = invoke(app, "inspect", str(run.root), "--stage", "detect", "--key", key, "--max-candidates", "50")
    assert r.exit_code == 0, r.output
    assert "select" in r.output and "nms_scope pair, nms_iou 0.5" in r.output
    assert r.output.count("kept") >= 3 and "NMS: overlaps box" in r.output and "<= min_score" in r.output
    # the kept candidates are exactly the pairs the run's select stage wrote
    kept = sorted((c["chunk"], c["x1"]) for c, f in zip(traces[0].row["candidates"], fates, strict=True)
                  if f.status == "kept")
    select = rows_by_key(RunFiles.open(str(run.root)), "select", [key])[0].row["pairs"]
    assert kept == sorted((p["chunk"], p["x1"]) for p in select)


def test_inspect_detect_of_a_select_v1_run_follows_its_rule(app, tmp_path):
    root = tmp_path / "v1"
    write_one_row_run(root, (40, 30), BG, "a dog and a cat", [(0, 5), (10, 15)], BOXES)
    config = yaml.safe_load((root / "run.yaml").read_text())
    config["select"]["nms_scope"] = "image"  # what select v1 recorded; its rule is v2's `box`
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    r = invoke(app, "inspect", str(root), "--stage", "detect", "--key", "000000000")
    assert r.exit_code == 0, r.output
    assert "nms_scope box" in r.output


def test_inspect_rejects(app, run):
    r = invoke(app, "inspect", str(run.root), "--stage", "chunks", "--rejects")
    assert r.exit_code == 0, r.output
    assert r.output.count("unsafe_caption") == 3  # one per shard
    assert "<script>alert('x')</script> a cat" in r.output
    r = invoke(app, "inspect", str(run.root), "--stage", "select", "--rejects", "--reason", "no_box", "-n", "1")
    assert r.output.count("no_box") == 1


def test_inspect_sample_is_deterministic(app, run):
    a = invoke(app, "inspect", str(run.root), "--stage", "detect", "-n", "3", "--seed", "7").output
    b = invoke(app, "inspect", str(run.root), "--stage", "detect", "-n", "3", "--seed", "7").output
    assert a == b
    shown = [k for keys in run.keys_by_shard.values() for k in keys if k in a]
    assert len(shown) == 3 and all(k.startswith("00000") for k in shown)  # from the first shard


def test_inspect_errors_name_the_problem(app, run, tmp_path):
    r = invoke(app, "inspect", str(run.root), "--stage", "compose", "--key", "nope")
    assert r.exit_code == 2 and "'nope'" in r.output
    r = invoke(app, "inspect", str(run.root), "--stage", "detekt")  # a choice: the parser names the stages
    assert r.exit_code == 2 and "'detekt'" in r.output and "'compose'" in r.output
    r = invoke(app, "inspect", str(tmp_path), "--stage", "compose")
    assert r.exit_code == 2 and "not a run directory" in r.output


# --- reads only what it shows ----------------------------------------------------------------------------
def test_inspect_key_on_object_store_reads_only_its_shard(run, monkeypatch):
    fs = fsspec.filesystem("memory")
    fs.put(str(run.root / "stages"), "/run/stages", recursive=True)
    fs.put(str(run.root / "run.yaml"), "/run/run.yaml")
    opened: list[str] = []
    real_open, real_cat = MemoryFileSystem._open, MemoryFileSystem.cat_file

    def tracking_open(self, path, *a, **kw):
        opened.append(path)
        return real_open(self, path, *a, **kw)

    def tracking_cat(self, path, *a, **kw):
        opened.append(path)
        return real_cat(self, path, *a, **kw)

    monkeypatch.setattr(MemoryFileSystem, "_open", tracking_open)
    monkeypatch.setattr(MemoryFileSystem, "cat_file", tracking_cat)
    try:
        key = run.keys_by_shard[2][1]
        traces = rows_by_key(RunFiles.open("memory://run"), "chunks", [key])
        assert traces[0].row["caption"] and traces[0].row["chunks"] and traces[0].shard == 2
    finally:
        fs.rm("/run", recursive=True)
    files = {p.rsplit("/run/", 1)[-1] for p in opened}
    assert "run.yaml" in files
    # other stages than the two shown are never opened, nor any stats or rejects file
    assert not [f for f in files if f.startswith(("stages/detect", "stages/select", "stages/compose"))]
    assert not [f for f in files if f.endswith((".stats.json", ".rejects.parquet"))]
    # other shards: at most the ingest key lookup (a footer and the key column), never chunks; which shards
    # exist comes from the stages' ledgers (a summary and a segment each), not from anything per shard
    assert {f for f in files if f.startswith("stages/") and "shard-00002" not in f and "/_ledger/" not in f} <= {
        f"stages/ingest/{FINGERPRINTS['ingest']}/shard-0000{s}.parquet" for s in (0, 1)}
    assert f"stages/chunks/{FINGERPRINTS['chunks']}/shard-00002.parquet" in files


# --- a run on S3 (moto's server mode on 127.0.0.1) ---------------------------------------------------------
@pytest.fixture
def s3_options():
    from moto_s3 import moto_server

    with moto_server(serial=False) as endpoint:
        yield {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}


@pytest.mark.slow
def test_report_and_inspect_on_s3(app, run, s3_options, monkeypatch):
    import json

    fs = fsspec.filesystem("s3", **s3_options)
    fs.mkdir("grit-report")
    fs.put(str(run.root / "stages"), "grit-report/run/stages", recursive=True)
    fs.put(str(run.root / "run.yaml"), "grit-report/run/run.yaml")
    monkeypatch.setitem(fsspec.config.conf, "s3", s3_options)  # how the CLI's fsspec finds the endpoint

    key = run.keys_by_shard[1][0]
    r = invoke(app, "inspect", "s3://grit-report/run", "--stage", "compose", "--key", key)
    assert r.exit_code == 0, r.output
    assert key in r.output and "<grounding>" in r.output

    r = invoke(app, "report", "s3://grit-report/run", "--sample", "4")
    assert r.exit_code == 0, r.output
    assert "s3://grit-report/run/report/index.html" in r.output
    html = fs.cat("grit-report/run/report/index.html").decode()
    assert html.count('<article class="card"') == 4
    summary = json.loads(fs.cat("grit-report/run/report/summary.json"))
    assert summary["stages"]["compose"]["rows_out"] == len(run.boxes)
