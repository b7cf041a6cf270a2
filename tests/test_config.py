"""PipelineConfig: YAML loading, dotted overrides with type coercion, errors naming the key, run.yaml round
trip, and the fingerprints that decide what a re-run reuses (no Ray)."""

from __future__ import annotations

import pytest
import yaml

from grit_pipeline.config import (
    ConfigError,
    dump_config,
    load_config,
    parse_override,
    parse_shard_spec,
)
from grit_pipeline.engine.plan import build_plan


def test_defaults_are_the_stage_defaults():
    cfg = load_config()
    assert cfg.select.min_score == 0.65  # the paper's threshold
    assert cfg.run.address is None and cfg.run.resources.detect.batch_size == 8


def test_yaml_then_overrides_are_coerced_by_pydantic(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"select": {"min_score": 0.5}, "run": {"num_cpus": 2}}))
    cfg = load_config(path, [
        "select.min_score=0.7",
        "compose.containment_filter=false",
        "chunks.filter_add=[sky, scene]",
        "run.resources.detect.pool_size=3",
        "run.shards=0-4",
    ])
    assert cfg.select.min_score == 0.7 and isinstance(cfg.select.min_score, float)
    assert cfg.compose.containment_filter is False
    assert sorted(cfg.chunks.filter_add) == ["scene", "sky"]
    assert cfg.run.resources.detect.pool_size == 3
    assert cfg.run.num_cpus == 2  # from the file, untouched by the overrides
    assert cfg.run.shards == "0-4"


@pytest.mark.parametrize("override, named", [
    ("select.min_scor=0.7", "select.min_scor"),
    ("selectt.min_score=0.7", "selectt"),
    ("run.resources.detekt.pool_size=2", "detekt"),
    ("run.resources.detect.pool=2", "run.resources.detect.pool"),
    ("select.min_score.x=1", "select.min_score.x"),
])
def test_unknown_override_key_is_an_error_naming_it(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_yaml_key_and_bad_value_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("select:\n  min_scor: 0.7\n")
    with pytest.raises(ConfigError, match=r"select\.min_scor"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"select\.min_score"):
        load_config(None, ["select.min_score=abc"])
    with pytest.raises(ConfigError, match=r"select\.min_score"):
        load_config(None, ["select.min_score=1.5"])  # outside [0, 1]
    with pytest.raises(ConfigError, match="stage.key=value"):
        parse_override("min_score=0.7")


def test_override_values_are_yaml_scalars():
    assert parse_override("a.b=0.7") == ("a.b", 0.7)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a.b=s3://bucket/x") == ("a.b", "s3://bucket/x")
    assert parse_override("a.b=x=y") == ("a.b", "x=y")


def test_run_yaml_round_trips_and_ignores_fingerprints():
    cfg = load_config(None, ["select.min_score=0.7", "run.resources.chunks.batch_size=64"])
    text = dump_config(cfg, {"select": "abc"})
    assert yaml.safe_load(text)["fingerprints"] == {"select": "abc"}
    again = load_config(None, base=yaml.safe_load(text))
    assert again == cfg


def test_shard_spec():
    assert parse_shard_spec("0-3,7") == {0, 1, 2, 3, 7}
    assert parse_shard_spec("5") == {5}
    for bad in ("3-1", "a", "1-", ""):
        with pytest.raises(ValueError):
            parse_shard_spec(bad)


def _fingerprints(synthetic_input, tmp_path, overrides=(), input_uri=None):
    cfg = load_config(None, [f"detect.replay_path={synthetic_input.detections}", "detect.backend=replay",
                             *overrides])
    plan = build_plan(cfg, input_uri=input_uri or str(synthetic_input.root), output_uri=str(tmp_path / "run"))
    return plan.fingerprints


def test_threshold_change_changes_select_and_compose_only(synthetic_input, tmp_path):
    base = _fingerprints(synthetic_input, tmp_path)
    assert len(set(base.values())) == 5
    changed = _fingerprints(synthetic_input, tmp_path, ["select.min_score=0.8"])
    assert {s for s in base if base[s] != changed[s]} == {"select", "compose"}
    chunks_changed = _fingerprints(synthetic_input, tmp_path, ["chunks.filter_add=[dog]"])
    assert {s for s in base if base[s] != chunks_changed[s]} == {"chunks", "detect", "select", "compose"}


def test_run_settings_do_not_change_fingerprints(synthetic_input, tmp_path):
    base = _fingerprints(synthetic_input, tmp_path)
    knobs = _fingerprints(synthetic_input, tmp_path, [
        "run.resources.detect.batch_size=2", "run.resources.detect.pool_size=4",
        "run.resources.chunks.pipe_batch_size=16", "run.resources.select.cpus=2", "run.num_cpus=1",
        "run.shards=0"])
    assert knobs == base


def test_an_execution_setting_in_a_stage_section_says_where_it_lives():
    with pytest.raises(ConfigError, match=r"run\.resources\.detect\.batch_size"):
        load_config(None, ["detect.batch_size=2"])
    with pytest.raises(ConfigError, match=r"run\.resources\.chunks\.pipe_batch_size"):
        load_config(None, base={"chunks": {"pipe_batch_size": 64}})


def test_another_input_or_limit_changes_every_fingerprint(synthetic_input, tmp_path):
    base = _fingerprints(synthetic_input, tmp_path)
    limited = _fingerprints(synthetic_input, tmp_path, ["run.limit=50"])
    assert all(base[s] != limited[s] for s in base)
    # the same folder named another way is the same source
    relative = _fingerprints(synthetic_input, tmp_path, input_uri=str(synthetic_input.root) + "/")
    assert relative == base


def test_limit_keeps_the_first_rows_in_shard_order(synthetic_input, tmp_path):
    cfg = load_config(None, ["detect.backend=replay", f"detect.replay_path={synthetic_input.detections}"])
    plan = build_plan(cfg, input_uri=str(synthetic_input.root), output_uri=str(tmp_path / "r"), limit=50)
    assert plan.shards == [0, 1] and plan.caps == {1: 10}  # 40 rows per shard
    plan = build_plan(cfg, input_uri=str(synthetic_input.root), output_uri=str(tmp_path / "r"), limit=40,
                      shards="1-3")
    assert plan.shards == [1] and plan.caps == {}
