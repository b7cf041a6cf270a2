"""`grit report` on a small run directory written in the documented layout (no Ray): the files it writes,
the funnel against summary.json, the gallery's overlays against the stage outputs, HTML escaping,
determinism, and the kept-fraction curve against re-runs of the real `select` stage."""

from __future__ import annotations

import json
import os
from html.parser import HTMLParser
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from test_report_support import FINGERPRINTS, write_fixture_run  # noqa: E402

from grit_pipeline.report.build import ReportOptions, build_report  # noqa: E402
from grit_pipeline.report.gallery import caption_pieces, sample_keys  # noqa: E402
from grit_pipeline.report.measures import SCORE_GRID  # noqa: E402
from stages.select import SelectConfig, SelectStage  # noqa: E402


class Elements(HTMLParser):
    """Every start tag with its attributes and the text inside it (good enough for a flat check)."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict, list[str]]] = []
        self._open: list[int] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs), []))
        if tag not in ("img", "meta", "link", "br", "rect", "path", "use", "line", "circle"):
            self._open.append(len(self.tags) - 1)

    def handle_endtag(self, tag):
        for i in range(len(self._open) - 1, -1, -1):
            if self.tags[self._open[i]][0] == tag:
                del self._open[i:]
                break

    def handle_data(self, data):
        for i in self._open:
            self.tags[i][2].append(data)

    def find(self, tag: str, **attrs) -> list[tuple[dict, str]]:
        return [(a, "".join(t)) for name, a, t in self.tags
                if name == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]


def parse(html: str) -> Elements:
    p = Elements()
    p.feed(html)
    return p


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_fixture_run(tmp_path_factory.mktemp("report") / "run")


@pytest.fixture(scope="module")
def report(run):
    result = build_report(str(run.root), ReportOptions(sample=100, max_candidates=4))
    html = (run.root / "report" / "index.html").read_text()
    return result, html, parse(html)


def stage_table(root: Path, stage: str, suffix: str = "parquet") -> pa.Table:
    d = root / "stages" / stage / FINGERPRINTS[stage]
    return pa.concat_tables([pq.read_table(p) for p in sorted(d.glob(f"shard-*.{suffix}"))
                             if p.name.count(".") == suffix.count(".") + 1])


def test_writes_index_and_summary_matching_the_stats(run, report):
    result, html, _ = report
    summary = json.loads((run.root / "report" / "summary.json").read_text())
    assert summary == result.summary
    # the summary is the engine's merge of the per-shard stats.json files
    for stage, fp in FINGERPRINTS.items():
        docs = [json.loads(p.read_text()) for p in sorted((run.root / "stages" / stage / fp).glob("*.stats.json"))]
        assert summary["stages"][stage]["rows_in"] == sum(d["rows_in"] for d in docs)
        assert summary["stages"][stage]["rows_out"] == sum(d["rows_out"] for d in docs)
    assert summary["stages"]["select"]["rejects"] == {"no_box": 2}
    assert result.index_url.endswith("report/index.html")


def test_funnel_cells_equal_summary(report):
    result, _, page = report
    for stage, s in result.summary["stages"].items():
        cells = {a["data-field"]: text for a, text in page.find("td") if "data-field" in a
                 and a.get("data-field") and _row_stage(page, a) == stage}
        assert cells["rows_in"] == str(s["rows_in"])
        assert cells["rows_out"] == str(s["rows_out"])
        assert cells["rejected"] == str(sum(s["rejects"].values()))
        assert cells["shards"] == str(s["shards"])
        chips = {a["data-reason"]: int(a["data-count"]) for a, _ in page.find("span") if a.get("class") == "reason"
                 and _row_stage(page, a) == stage}
        assert chips == s["rejects"]


def _row_stage(page: Elements, attrs: dict) -> str | None:
    """The data-stage of the funnel <tr> enclosing the element with these (identical) attrs."""
    stage = None
    for name, a, _ in page.tags:
        if name == "tr" and "data-stage" in a:
            stage = a["data-stage"]
        if a is attrs:
            return stage
    return None


def test_page_is_self_contained(report):
    _, html, page = report
    imgs = page.find("img")
    assert imgs and all(a["src"].startswith("data:image/jpeg;base64,") for a, _ in imgs)
    for tag, attr in (("script", "src"), ("link", "href"), ("img", "src")):
        for a, _ in page.find(tag):
            assert not a.get(attr, "data:").startswith(("http:", "https:", "//")), (tag, a)
    assert "http-equiv" in html and "default-src 'none'" in html
    assert len(page.find("script")) == 1  # only the layer toggle


def test_gallery_boxes_match_stage_outputs(run, report):
    _, _, page = report
    detect = {r["key"]: r["candidates"] for r in stage_table(run.root, "detect").to_pylist()}
    pairs = {r["key"]: r["pairs"] for r in stage_table(run.root, "select").to_pylist()}
    final = {r["key"]: r["noun_chunks"] for r in stage_table(run.root, "compose").to_pylist()}
    cards = [a["data-key"] for a, _ in page.find("article")]
    assert sorted(cards) == sorted(detect)  # sample=100 > rows: every row the detector saw
    layer_of = {}
    current_card = None
    counts = {k: {"candidates": 0, "selected": 0, "final": 0} for k in cards}
    for name, a, _ in page.tags:
        if name == "article":
            current_card = a["data-key"]
        elif name == "g" and a.get("data-layer"):
            layer_of = a["data-layer"]
        elif name == "rect" and a.get("class") == "box":
            counts[current_card][layer_of] += 1
    for key in cards:
        assert counts[key]["candidates"] == min(4, len({c["box"] for c in detect[key]}))
        assert counts[key]["selected"] == len(pairs.get(key, []))
        assert counts[key]["final"] == len(final.get(key, []))
    # rows dropped by select say so on their card
    dropped = [text for a, text in page.find("div") if a.get("class") == "dropped"]
    assert len(dropped) == len(set(detect) - set(pairs))
    assert all("no_box" in t for t in dropped)


def test_box_geometry_in_overlay(run, report):
    _, _, page = report
    key, boxes = next(iter(sorted(run.boxes.items())))
    found, card, layer, svg = [], None, None, None
    for name, a, _ in page.tags:
        if name == "article":
            card = a["data-key"]
        elif name == "svg" and a.get("class") == "overlay":
            svg = [float(v) for v in a["viewbox"].split()]
        elif name == "g" and a.get("data-layer"):
            layer = a["data-layer"]
        elif name == "rect" and card == key and layer == "final":
            x, y, w, h = (float(a[k]) for k in ("x", "y", "width", "height"))
            found.append((x / svg[2], y / svg[3], (x + w) / svg[2], (y + h) / svg[3]))
    assert len(found) == len(boxes)
    for got, want in zip(found, boxes, strict=True):
        assert got == pytest.approx(want, abs=0.5 / min(svg[2:]) + 1e-9)


def test_captions_and_details_are_escaped(report):
    _, html, page = report
    assert "<script>alert" not in html  # the hostile caption of the rows chunks rejected
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; a cat" in html
    assert 'a &#34;sofa&#34;</mark> [1]' in html and "</mark> &amp; <mark" in html
    assert 'a "sofa"' in [text for _, text in page.find("mark")]
    rejects = page.find("details", data_stage="chunks", data_reason="unsafe_caption")
    assert len(rejects) == 1 and "<script>alert('x')</script> a cat" in rejects[0][1]


def test_chunk_spans_highlighted(report):
    _, _, page = report
    marks = [text for a, text in page.find("mark")]
    assert "a dog" in marks and "a field" in marks and "flowers" in marks
    pieces = caption_pieces("a dog in a field", [{"start": 0, "end": 5}, {"start": 9, "end": 16}])
    assert [(p.text, p.chunk) for p in pieces] == [("a dog", 0), (" in ", None), ("a field", 1)]


def test_report_is_byte_identical_on_rebuild(run, report):
    _, html, _ = report
    build_report(str(run.root), ReportOptions(sample=100, max_candidates=4))
    assert (run.root / "report" / "index.html").read_text() == html


def test_sample_is_deterministic_and_seeded():
    keys = [f"{s:05d}{i:04d}" for s in range(5) for i in range(50)]
    a = sample_keys(keys, 10, seed=0)
    assert a == sample_keys(list(reversed(keys)), 10, seed=0)
    assert len(set(a)) == 10 and set(a) <= set(keys)
    assert sample_keys(keys, 10, seed=1) != a
    assert len({k[:5] for k in a}) > 1  # not all from the first shard


def _rerun_select(root: Path, min_score: float, scope: str = "pair") -> tuple[int, int]:
    """(rows into select, rows kept) from running SelectStage over the stored detect outputs + chunks."""
    detect = stage_table(root, "detect")
    chunks = stage_table(root, "chunks")
    table = detect.append_column("chunks", chunks["chunks"].take(pc.index_in(detect["key"], chunks["key"])))
    out = SelectStage(SelectConfig(min_score=min_score, nms_iou=0.5, nms_scope=scope)).process_batch(table)
    assert out.output.num_rows + out.rejects.num_rows == table.num_rows
    return table.num_rows, out.output.num_rows


@pytest.mark.parametrize("scope", ["pair", "box", "chunk"])  # NMS never removes a row's best pair
@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_kept_fraction_matches_select_rerun(run, report, threshold, scope):
    result, _, _ = report
    kept = json.loads((run.root / "report" / "kept_fraction.json").read_text())
    assert kept == result.kept_fraction
    rows, survivors = _rerun_select(run.root, threshold, scope)
    assert kept["rows"] == rows
    i = SCORE_GRID.index(threshold)
    assert kept["thresholds"][i] == threshold
    assert round(kept["kept_share"][i] * rows) == survivors
    # and at the run's own threshold the curve gives what select actually kept
    assert kept["kept_at_min_score"] == result.summary["stages"]["select"]["rows_out"]


def test_kept_fraction_curve_changes_between_thresholds(run, report):
    """The fixture's scores straddle both thresholds, so the comparison above is not vacuous."""
    assert _rerun_select(run.root, 0.5)[1] != _rerun_select(run.root, 0.8)[1]


def _card_tags(page: Elements, key: str) -> list[tuple[str, dict, str]]:
    out, inside = [], False
    for name, a, text in page.tags:
        if name == "article":
            inside = a.get("data-key") == key
        elif inside:
            out.append((name, a, "".join(text)))
    return out


def test_unreadable_image_gets_a_placeholder_and_its_boxes(tmp_path):
    run = write_fixture_run(tmp_path / "run", shards=1, rows_per_shard=6)
    key = sorted(run.boxes)[0]
    (run.root / "images" / f"{key}.jpg").unlink()
    build_report(str(run.root), ReportOptions(sample=100))
    tags = _card_tags(parse((run.root / "report" / "index.html").read_text()), key)
    assert not [a for name, a, _ in tags if name == "img"]
    assert [a for name, a, _ in tags if name == "svg" and a.get("class") == "placeholder"]
    assert any(name == "span" and a.get("class") == "noimg" and "image_unreadable" in text for name, a, text in tags)
    final = 0
    layer = None
    for name, a, _ in tags:
        layer = a["data-layer"] if name == "g" and a.get("data-layer") else layer
        final += name == "rect" and layer == "final"
    assert final == len(run.boxes[key])


def test_max_shards_limits_what_the_plots_read(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run.root, copy)
    result = build_report(str(copy), ReportOptions(sample=3, max_shards=1))
    [shard] = result.sample.of("detect")
    detect = pq.read_table(copy / "stages" / "detect" / FINGERPRINTS["detect"] / f"shard-{shard:05d}.parquet")
    assert result.kept_fraction["rows"] == detect.num_rows < stage_table(copy, "detect").num_rows
    assert all(k in detect["key"].to_pylist() for k in result.gallery_keys)
    assert "Computed over 1 of 2 shards" in (copy / "report" / "index.html").read_text()


def test_report_of_a_run_stopped_after_chunks(run, tmp_path):
    import shutil

    import yaml

    copy = tmp_path / "run"
    shutil.copytree(run.root, copy)
    cfg = yaml.safe_load((copy / "run.yaml").read_text())
    cfg["fingerprints"] = {k: v for k, v in cfg["fingerprints"].items() if k in ("ingest", "chunks")}
    (copy / "run.yaml").write_text(yaml.safe_dump(cfg))
    result = build_report(str(copy), ReportOptions(sample=3))
    assert list(result.summary["stages"]) == ["ingest", "chunks"]
    page = parse((copy / "report" / "index.html").read_text())
    assert len(page.find("article")) == 3
    assert not page.find("rect", **{"class": "box"}) and not page.find("button") and not page.find("table", **{"class": "kept"})
    assert [a["data-plot"] for a, _ in page.find("figure")] == ["chunks"]
    assert result.kept_fraction["rows"] == 0
