"""The report of a real engine run (local Ray, synthetic img2dataset input, replay detector): opened in
headless Chromium, its kept-fraction curve checked against re-runs of `select`, and `inspect --png` on it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from grit_pipeline.report.build import ReportOptions, build_report  # noqa: E402
from grit_pipeline.report.measures import SCORE_GRID  # noqa: E402
from stages.select import SelectConfig, SelectStage  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SAMPLE = 8
MAX_CANDIDATES = 40


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory, ray_local) -> Path:
    """A full pipeline run through the Python API: 2 shards x 12 rows of 320x240 images, replay detector."""
    from grit_pipeline.api import run_pipeline
    from grit_pipeline.assets.synthetic import replay_overrides, write_img2dataset

    base = tmp_path_factory.mktemp("engine")
    src = write_img2dataset(base / "in", shards=2, rows_per_shard=12, image_size=(320, 240))
    result = run_pipeline(input=str(src.root), output=str(base / "run"),
                          overrides=[*replay_overrides(src.detections), "run.progress=false"])
    assert result.ok, result.failures
    return base / "run"


@pytest.fixture(scope="module")
def report(engine_run):
    return build_report(str(engine_run), ReportOptions(sample=SAMPLE, max_candidates=MAX_CANDIDATES))


def stage_rows(run: Path, stage: str, suffix: str = "parquet") -> pa.Table:
    fp = yaml.safe_load((run / "run.yaml").read_text())["fingerprints"][stage]
    files = sorted(p for p in (run / "stages" / stage / fp).glob(f"shard-*.{suffix}")
                   if p.name.count(".") == suffix.count(".") + 1)
    return pa.concat_tables([pq.read_table(p) for p in files])


def select_section(run: Path) -> dict:
    return yaml.safe_load((run / "run.yaml").read_text())["select"]


@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_kept_fraction_curve_matches_select_rerun(engine_run, report, threshold):
    detect, chunks = stage_rows(engine_run, "detect"), stage_rows(engine_run, "chunks")
    table = detect.append_column("chunks", chunks["chunks"].take(pc.index_in(detect["key"], chunks["key"])))
    config = SelectConfig(**{**select_section(engine_run), "min_score": threshold})
    rerun = SelectStage(config).process_batch(table)

    kept = json.loads((engine_run / "report" / "kept_fraction.json").read_text())
    i = SCORE_GRID.index(threshold)
    assert kept["rows"] == detect.num_rows
    assert round(kept["kept_share"][i] * kept["rows"]) == rerun.output.num_rows
    # at the run's own threshold the curve gives what the engine's select kept
    assert kept["kept_at_min_score"] == report.summary["stages"]["select"]["rows_out"]


def test_thresholds_tested_give_different_answers(engine_run):
    kept = json.loads((engine_run / "report" / "kept_fraction.json").read_text())
    assert kept["kept_share"][SCORE_GRID.index(0.5)] > kept["kept_share"][SCORE_GRID.index(0.8)]


def test_inspect_png_on_engine_run(engine_run, tmp_path):
    from grit_pipeline.cli import app

    key = stage_rows(engine_run, "compose")["key"][0].as_py()
    out = tmp_path / "row.png"
    r = CliRunner().invoke(app, ["inspect", str(engine_run), "--stage", "compose", "--key", key, "--png", str(out)])
    assert r.exit_code == 0, r.output
    assert Image.open(out).size == (320, 240)
    assert key in r.output and "grounded" in r.output


@pytest.mark.browser
def test_report_in_headless_chromium(engine_run, report):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (`make install` installs Debian's package); browser test skipped")
    from playwright.sync_api import sync_playwright

    summary = json.loads((engine_run / "report" / "summary.json").read_text())
    detect = {r["key"]: r["candidates"] for r in stage_rows(engine_run, "detect").to_pylist()}
    pairs = {r["key"]: r["pairs"] for r in stage_rows(engine_run, "select").to_pylist()}
    final = {r["key"]: r["noun_chunks"] for r in stage_rows(engine_run, "compose").to_pylist()}
    expected_cards = min(SAMPLE, len(detect))

    url = (engine_run / "report" / "index.html").as_uri()
    problems, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url, wait_until="load")

            # gallery: one card and one decoded image per sampled row
            cards = page.locator("article.card")
            assert cards.count() == expected_cards
            assert page.locator("article.card img.thumb").count() == expected_cards
            assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")

            # overlays: each layer of each card holds that stage's boxes for the row
            total = {"candidates": 0, "selected": 0, "final": 0}
            for i in range(expected_cards):
                card = cards.nth(i)
                key = card.get_attribute("data-key")
                want = {"candidates": min(MAX_CANDIDATES, len({c["box"] for c in detect[key]})),
                        "selected": len(pairs.get(key, [])), "final": len(final.get(key, []))}
                for layer, n in want.items():
                    assert card.locator(f'g[data-layer="{layer}"] rect.box').count() == n, (key, layer)
                    total[layer] += n
            assert total["final"] > 0 and total["candidates"] > total["final"]

            # the toggle shows one layer at a time
            assert page.locator("svg.overlay rect.box:visible").count() == total["final"]
            page.get_by_role("button", name="Candidates").click()
            assert page.locator("svg.overlay rect.box:visible").count() == total["candidates"]
            assert page.locator('g[data-layer="final"] rect.box:visible').count() == 0
            page.keyboard.press("2")
            assert page.locator("svg.overlay rect.box:visible").count() == total["selected"]
            page.keyboard.press("3")

            # funnel numbers are summary.json's
            for stage, s in summary["stages"].items():
                row = page.locator(f'table.funnel tr[data-stage="{stage}"]')
                for field in ("shards", "rows_in", "rows_out"):
                    assert row.locator(f'td[data-field="{field}"]').inner_text() == str(s[field])
                assert row.locator('td[data-field="rejected"]').inner_text() == str(sum(s["rejects"].values()))
                for reason, n in s["rejects"].items():
                    assert row.locator(f'span.reason[data-reason="{reason}"]').get_attribute("data-count") == str(n)

            # rejects are browsable: opening a reason shows its examples
            group = page.locator('details.rejects[data-stage="select"][data-reason="no_box"]')
            group.locator("summary").click()
            assert group.locator("tbody tr").first.is_visible()

            page.evaluate("window.scrollTo(0, 0)")  # the sticky nav belongs at the top of a full-page shot
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        finally:
            browser.close()
    assert not problems, problems
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000
