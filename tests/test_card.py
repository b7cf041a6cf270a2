"""Publishing a run: provenance in every final shard's Parquet metadata, and the Hub dataset card
(`grit/README.md`) read back with `huggingface_hub.DatasetCard`."""

from __future__ import annotations

import io
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import DatasetCard, DatasetCardData

from grit_pipeline.config import config_dict, load_config
from grit_pipeline.engine.card import (
    METADATA_KEY,
    ShardMetadataError,
    dataset_card,
    hub_features,
    read_shard_metadata,
    shard_metadata,
)
from grit_pipeline.engine.fingerprint import chain_fingerprints, source_fingerprint
from grit_pipeline.engine.stats import merge
from schemas.grounded_text import build_grounded_caption, build_markdown_caption
from schemas.tables import GRIT_SCHEMA
from stages.registry import STAGE_ORDER, stage_class

CAPTION = "a dog next to a red ball"
DOG, BALL = (0, 5, (0.1, 0.2, 0.5, 0.9)), (14, 24, (0.6, 0.5, 0.8, 0.7))


def grit_table(rows: int = 2) -> pa.Table:
    spans = [DOG, BALL]
    entries = [[float(s), float(e), *box, 0.9] for s, e, box in spans]
    tagged = [(s, e, [box]) for s, e, box in spans]
    row = {"url": "http://example.com/a.jpg", "caption": CAPTION, "width": 640, "height": 480,
           "noun_chunks": entries, "ref_exps": entries,
           "grounded_caption": build_grounded_caption(CAPTION, tagged),
           "markdown_caption": build_markdown_caption(CAPTION, tagged)}
    return pa.Table.from_pylist([{"key": f"{i:09d}", **row} for i in range(rows)], schema=GRIT_SCHEMA)


def resolved(overrides: list[str]) -> tuple[dict, dict[str, str], list[dict]]:
    """A real resolved config, its fingerprint chain and the stage records, as the engine makes them."""
    cfg = load_config(None, ["run.input=/data/laion/part-0", *overrides])
    fps = chain_fingerprints([(n, stage_class(n).version, getattr(cfg, n)) for n in STAGE_ORDER],
                             source_fingerprint(cfg.run.input, cfg.run.limit))
    stages = [{"name": n, "version": stage_class(n).version, "fingerprint": fps[n]} for n in STAGE_ORDER]
    return config_dict(cfg), fps, stages


def write_shard(path, metadata: dict[bytes, bytes]) -> None:
    table = grit_table()
    pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata}), path)


# --- shard metadata -----------------------------------------------------------------------------------


def test_shard_metadata_reads_back_with_pyarrow(tmp_path):
    config, fps, stages = resolved(["select.min_score=0.7"])
    path = tmp_path / "shard-00000.parquet"
    write_shard(path, shard_metadata("1.2.3", stages, config))

    raw = json.loads(pq.read_metadata(path).metadata[METADATA_KEY])  # pyarrow alone, as the card says
    assert raw["pipeline_version"] == "1.2.3" and raw["format"] == 1
    assert [(s["name"], s["version"], s["fingerprint"]) for s in raw["stages"]] == [
        (n, stage_class(n).version, fps[n]) for n in STAGE_ORDER]
    assert sorted(raw["config"]) == sorted(STAGE_ORDER)  # JSON with sorted keys
    assert raw["config"]["select"]["min_score"] == 0.7
    assert raw["config"]["detect"] == config["detect"]
    assert "run" not in raw["config"]

    assert read_shard_metadata(str(path)) == raw
    with open(path, "rb") as f:
        assert read_shard_metadata(f) == raw
    assert pq.read_table(path).equals(grit_table())  # the rows are untouched


def test_read_shard_metadata_through_fsspec(tmp_path):
    _, _, stages = resolved([])
    config, _, _ = resolved([])
    buf = io.BytesIO()
    table = grit_table()
    pq.write_table(table.replace_schema_metadata(shard_metadata("0.1.0", stages, config)), buf)
    with fsspec.open("memory://card-test/grit/shard-00003.parquet", "wb") as f:
        f.write(buf.getvalue())
    assert read_shard_metadata("memory://card-test/grit/shard-00003.parquet")["stages"] == stages
    fs = fsspec.filesystem("memory")
    assert read_shard_metadata("/card-test/grit/shard-00003.parquet", filesystem=fs)["pipeline_version"] == "0.1.0"


def test_execution_settings_leave_shard_bytes_unchanged(tmp_path):
    config, _, stages = resolved([])
    busy, busy_fps, busy_stages = resolved(["run.num_cpus=64", "run.resources.detect.batch_size=32",
                                            "run.resources.chunks.pool_size=8", "run.progress=false"])
    assert busy["run"] != config["run"] and busy_stages == stages  # execution knobs: same fingerprints
    write_shard(tmp_path / "a.parquet", shard_metadata("0.1.0", stages, config))
    write_shard(tmp_path / "b.parquet", shard_metadata("0.1.0", busy_stages, busy))
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()

    changed, _, changed_stages = resolved(["select.min_score=0.8"])
    write_shard(tmp_path / "c.parquet", shard_metadata("0.1.0", changed_stages, changed))
    assert (tmp_path / "c.parquet").read_bytes() != (tmp_path / "a.parquet").read_bytes()


def test_shard_without_metadata_and_bad_stage_records(tmp_path):
    path = tmp_path / "plain.parquet"
    pq.write_table(grit_table(), path)
    with pytest.raises(ShardMetadataError, match="plain.parquet.*grit_pipeline"):
        read_shard_metadata(str(path))
    config, _, stages = resolved([])
    with pytest.raises(ValueError, match=r"stages\[1\] lacks fingerprint"):
        shard_metadata("0.1.0", [stages[0], {"name": "chunks", "version": 1}], config)
    with pytest.raises(ValueError, match="no section for stage"):
        shard_metadata("0.1.0", [*stages, {"name": "rerank", "version": 1, "fingerprint": "0" * 16}], config)


# --- dataset card -------------------------------------------------------------------------------------


def run_summary() -> dict:
    """The funnel of a two-shard run, merged by the engine's own `stats.merge` from per-shard stats."""
    shards = {  # stage: [(rows_in, rows_out, rejects) of shard 0, of shard 1]
        "ingest": [(30, 27, {"download_failed": 3}), (30, 28, {"download_failed": 1, "empty_caption": 1})],
        "chunks": [(27, 25, {"no_chunks": 2}), (28, 25, {"no_chunks": 3})],
        "detect": [(25, 25, {}), (25, 25, {})],
        "select": [(25, 20, {"no_box": 5}), (25, 21, {"no_box": 4})],
        "compose": [(20, 20, {}), (21, 20, {"unsafe_caption": 1})],
    }
    per_stage = {stage: [{"stage": stage, "shard": shard, "fingerprint": "f" * 16, "rows_in": rows_in,
                          "rows_out": rows_out, "rejects": rejects, "seconds": 1.5 + shard}
                         for shard, (rows_in, rows_out, rejects) in enumerate(docs)]
                 for stage, docs in shards.items()}
    return merge(STAGE_ORDER, per_stage)


def make_card(**changes) -> str:
    config, fps, _ = resolved(["select.min_score=0.7", "detect.backend=hf",
                               "detect.hf_model=/models/grounding-dino-base"])
    schema = GRIT_SCHEMA.append(pa.field("clip_similarity_vitb32", pa.float32()))
    args = dict(summary=run_summary(), config=config, fingerprints=fps, schema=schema,
                command="grit run -c configs/default.yaml --input /data/laion --output runs/a select.min_score=0.7",
                shard_files=["runs/a/grit/shard-00000.parquet", "runs/a/grit/shard-00001.parquet"],
                num_bytes=123_456, pipeline_version="0.1.0")
    args.update(changes)
    return dataset_card(**args)


def test_card_metadata_parses_as_a_hub_dataset_card():
    text = make_card()
    card = DatasetCard(text)
    data = card.data
    assert isinstance(data, DatasetCardData)
    assert data.license is None  # left for the user, with a comment saying so
    assert "license:\n" in text and "# LICENSE: fill this in before publishing" in text
    assert data.language == ["en"]  # from the spaCy pipeline's name
    assert data.size_categories == ["n<1K"]
    assert "image-to-text" in data.task_categories and "grounding" in data.tags
    assert data.configs == [{"config_name": "default", "data_files": [{"split": "train", "path": "shard-*.parquet"}]}]
    info = data.dataset_info
    # complete as `datasets` reads it: every split with name, num_bytes and num_examples, and the sizes
    assert info["splits"] == [{"name": "train", "num_bytes": 123_456, "num_examples": 40}]
    assert info["dataset_size"] == info["download_size"] == 123_456
    features = {f["name"]: {k: v for k, v in f.items() if k != "name"} for f in info["features"]}
    assert list(features) == [*GRIT_SCHEMA.names, "clip_similarity_vitb32"]
    assert features["key"] == {"dtype": "string"} and features["width"] == {"dtype": "int32"}
    assert features["noun_chunks"] == features["ref_exps"] == {"list": {"list": "float64"}}
    assert features["clip_similarity_vitb32"] == {"dtype": "float32"}


def test_card_body_has_funnel_thresholds_detector_and_command():
    text = make_card()
    body = DatasetCard(text).text
    assert "| ingest | 2 | 60 | 55 | 91.7% | download\\_failed 4, empty\\_caption 1 |" in body
    assert "| select | 2 | 50 | 41 | 68.3% | no\\_box 9 |" in body
    nms_iou = load_config(None).select.nms_iou  # the default, not written in the config
    assert "| min\\_score | 0.7 |" in body and f"| nms\\_iou | {nms_iou} |" in body
    assert "| location\\_encoder | unilm |" in body
    assert "Backend `hf`" in body and "| hf\\_model | /models/grounding-dino-base |" in body
    assert "grit run -c configs/default.yaml --input /data/laion --output runs/a select.min_score=0.7" in body
    assert "40 rows in 2 shard(s)" in body
    assert "seconds" not in body and "1.5" not in body  # no timings: the card is a function of the run's inputs
    assert make_card() == text


def test_card_data_files_and_untrusted_text():
    odd = make_card(shard_files=["part-a.parquet", "part-b.parquet"])
    assert DatasetCard(odd).data.configs[0]["data_files"] == [
        {"split": "train", "path": "part-a.parquet"}, {"split": "train", "path": "part-b.parquet"}]

    text = make_card(command="grit run --output 'runs/x' ```\x1b[31m red", pipeline_version="0.1.0|<b>")
    assert "\x1b" not in text and "\\x1b[31m" in text
    assert "````bash\n" in text  # a fence longer than any backtick run in the command
    assert "0.1.0\\|\\<b\\>" in text


def test_hub_features_of_nested_types():
    schema = pa.schema([
        ("pairs", pa.list_(pa.struct([("chunk", pa.int32()), ("score", pa.float32())]))),
        ("box", pa.list_(pa.float64(), 4)),
        ("tags", pa.large_list(pa.string())),
        ("source", pa.dictionary(pa.int8(), pa.string())),
        ("meta", pa.struct([("w", pa.int64()), ("ok", pa.bool_())])),
        ("when", pa.timestamp("us")),
    ])
    assert hub_features(schema) == [
        {"name": "pairs", "list": [{"name": "chunk", "dtype": "int32"}, {"name": "score", "dtype": "float32"}]},
        {"name": "box", "list": "float64", "length": 4},
        {"name": "tags", "large_list": "string"},
        {"name": "source", "dtype": "string"},
        {"name": "meta", "struct": [{"name": "w", "dtype": "int64"}, {"name": "ok", "dtype": "bool"}]},
        {"name": "when", "dtype": "timestamp[us]"},
    ]
    with pytest.raises(ValueError, match="'lookup'"):
        hub_features(pa.schema([("lookup", pa.map_(pa.string(), pa.int32()))]))


def test_final_shard_sizes_come_from_one_listing(tmp_path):
    from grit_pipeline.rundir.store import RunDir

    rundir = RunDir(str(tmp_path / "run"))
    assert rundir.final_shard_sizes() == {}
    grit = tmp_path / "run" / "grit"
    grit.mkdir(parents=True)
    for shard, rows in ((3, 5), (0, 2)):
        pq.write_table(grit_table(rows), grit / f"shard-{shard:05d}.parquet")
    (grit / "README.md").write_text("card")
    (grit / "shard-00007.parquet.tmp").write_bytes(b"x")
    (grit / "shard-00009.parquet").mkdir()  # not a file
    sizes = rundir.final_shard_sizes()
    assert sizes == {0: (grit / "shard-00000.parquet").stat().st_size, 3: (grit / "shard-00003.parquet").stat().st_size}
    assert list(sizes) == [0, 3]
