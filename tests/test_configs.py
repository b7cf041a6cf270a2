"""The shipped configs (`configs/*.yaml`): each loads through the engine's `PipelineConfig` (unknown keys are
errors), the production config holds the paper's thresholds, and the GRIT-20M config re-processes the one
published GRIT-20M row into a valid shard with the published boxes."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from grit_pipeline.config import load_config
from schemas.location import encode_box

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
PUBLISHED = REPO / "tests" / "data" / "grit_published_samples.jsonl"


def test_the_four_configs_exist():
    assert {p.name for p in CONFIGS} >= {"default.yaml", "demo.yaml", "grit20m.yaml", "hf-owlv2.yaml"}


def _assert_written_values_survive(model, values: dict, where: str) -> None:
    for key, value in values.items():
        got = getattr(model, key)
        if isinstance(value, dict) and hasattr(got, "model_fields"):  # a nested section (run.resources.detect)
            _assert_written_values_survive(got, value, f"{where}.{key}")
            continue
        if isinstance(got, tuple):
            got = list(got)
        assert got == value, f"{where}.{key}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_every_key_is_a_stage_field(path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    for section, values in raw.items():  # every key written in the file survives validation as written
        _assert_written_values_survive(getattr(cfg, section), values or {}, f"{path.name}: {section}")


def test_default_config_is_groundingdino_with_the_paper_thresholds():
    cfg = load_config(REPO / "configs" / "default.yaml")
    assert cfg.detect.backend == "groundingdino" and cfg.detect.gd_checkpoint
    assert cfg.select.min_score == 0.65 and cfg.select.nms_scope == "pair" and cfg.select.nms_iou == 0.7
    assert cfg.compose.containment_filter and cfg.compose.location_encoder == "unilm"


def test_demo_config_paths_exist_from_the_repository_root():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert (REPO / cfg.run.input).is_dir()
    assert (REPO / cfg.detect.replay_path).is_file()


def test_grit20m_config_needs_no_images_and_no_gpu():
    cfg = load_config(REPO / "configs" / "grit20m.yaml")
    from stages.detect import DetectStage

    assert DetectStage(cfg.detect).resources.gpus == 0
    assert cfg.ingest.require_image is False and cfg.chunks.from_column == "src_noun_chunks"
    assert cfg.select.nms_iou >= 1.0


@pytest.mark.ray
@pytest.mark.slow
def test_grit20m_config_reprocesses_the_published_row(ray_local, tmp_path):
    from grit_pipeline.api import run_pipeline
    from grit_pipeline.commands.validate import validate_run

    native = [r for r in map(json.loads, PUBLISHED.read_text().splitlines()) if r.get("format") == "grit_native"]
    assert len(native) == 1
    published = native[0]
    source = tmp_path / "grit-20m.jsonl"  # the released columns only, as in a GRIT-20M file
    columns = ("key", "clip_similarity_vitb32", "clip_similarity_vitl14", "id", "url", "caption", "width",
               "height", "noun_chunks", "ref_exps")
    source.write_text(json.dumps({c: published[c] for c in columns}) + "\n")

    run = tmp_path / "run"
    result = run_pipeline(REPO / "configs" / "grit20m.yaml", input=str(source), output=str(run),
                          overrides=["run.resources.chunks.pool_size=1"], progress=False)
    assert result.ok, result.failures
    report = validate_run(str(run))
    assert report.ok and report.rows == 1, report.problems

    (row,) = pq.read_table(run / "grit" / "shard-00000.parquet").to_pylist()
    assert row["key"] == published["key"] and row["caption"] == published["caption"]
    assert row["id"] == published["id"] and row["clip_similarity_vitb32"] == published["clip_similarity_vitb32"]
    # Spans and boxes exactly as released, in the released order; scores at float32 precision.
    assert [e[:6] for e in row["noun_chunks"]] == [e[:6] for e in published["noun_chunks"]]
    assert [e[6] for e in row["noun_chunks"]] == pytest.approx([e[6] for e in published["noun_chunks"]], rel=1e-6)
    # The referring expressions, re-derived by spaCy from the caption alone, are the released ones.
    assert [e[:6] for e in row["ref_exps"]] == [e[:6] for e in published["ref_exps"]]
    # The box of the widest expression is tagged with the location tokens the official rule gives
    # (DESIGN.md / eval README: <patch_index_0000><patch_index_1022> for the wire hanger).
    hanger = next(e for e in published["noun_chunks"] if e[0] == 0)
    ul, lr = encode_box(hanger[2:6], "unilm")
    assert (ul, lr) == (0, 1022)
    assert f"<patch_index_{ul:04d}><patch_index_{lr:04d}>" in row["grounded_caption"]
