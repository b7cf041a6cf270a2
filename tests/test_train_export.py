"""`grit export` rows for Hugging Face Kosmos-2 fine-tuning, the trainer CLI, and reading GrIT shards the
way the pipeline writes them (passthrough columns, images inside webdataset tars)."""

import io
import json
import os
import tarfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
import yaml
from PIL import Image
from transformers.models.kosmos2.processing_kosmos2 import clean_text_and_extract_entities_with_bboxes
from typer.testing import CliRunner

from grit_pipeline.train.commands import register
from grit_pipeline.train.evaluate import evaluate
from grit_pipeline.train.export import export_kosmos2
from grit_pipeline.train.testing import TINY_MODEL, tiny_config, tiny_shards
from grit_pipeline.train.trainer import train
from schemas.grounded_text import build_grounded_caption, build_markdown_caption
from schemas.location import decode_box, encode_box
from schemas.tables import GRIT_FIELDS


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    tiny_shards(str(root), shards=2, rows=5)
    return str(root)


def test_imagefolder_export_text_is_what_kosmos2_parses(shards, tmp_path):
    summary = export_kosmos2(shards, str(tmp_path / "out"))
    assert summary["rows"] == 10 and summary["missing_images"] == 0
    lines = [json.loads(x) for x in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    source = pq.read_table(os.path.join(shards, "shard-00000.parquet")).to_pylist()
    source += pq.read_table(os.path.join(shards, "shard-00001.parquet")).to_pylist()
    assert [x["key"] for x in lines] == [r["key"] for r in source]
    for line, row in zip(lines, source, strict=True):
        assert line["text"] == row["grounded_caption"]
        assert (tmp_path / "out" / line["file_name"]).read_bytes() == (Path(shards) / row["url"]).read_bytes()
        caption, entities = clean_text_and_extract_entities_with_bboxes(line["text"])
        assert caption == row["caption"]
        assert [span for _, span, _ in entities] == [(int(e[0]), int(e[1])) for e in row["ref_exps"]]
        assert [boxes[0] for _, _, boxes in entities] == [pytest.approx(decode_box(*encode_box(e[2:6])))
                                                          for e in row["ref_exps"]]


def test_parquet_export_embeds_image_bytes(shards, tmp_path):
    summary = export_kosmos2(shards, str(tmp_path / "out"), fmt="parquet", max_rows=7)
    assert summary["rows"] == 7 and len(summary["files"]) == 2
    table = pq.read_table(tmp_path / "out" / "data-00000.parquet")
    assert table.schema.names == ["key", "image", "text"]
    row = table.to_pylist()[0]
    assert Image.open(io.BytesIO(row["image"])).format == "PNG" and row["text"].startswith("<grounding>")


# --- shards as the pipeline writes them -------------------------------------------------------------------


def _pipeline_like_run(tmp_path: Path) -> Path:
    """A run directory laid out as `grit run` writes it: final GrIT shards with passthrough columns and the
    source's web `url`, the images in the source's webdataset tar, and ingest's `image_ref` (a chained
    `tar://` URL) only in the ingest stage output named by run.yaml's fingerprint."""
    tar_path = tmp_path / "source" / "00000.tar"
    tar_path.parent.mkdir()
    rows, refs = [], []
    with tarfile.open(tar_path, "w") as tar:
        for i in range(6):
            buf = io.BytesIO()
            Image.new("RGB", (48, 32), (i * 40, 100, 200)).save(buf, format="JPEG")
            info = tarfile.TarInfo(f"0000{i:05d}.jpg")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
            caption = "a dog in a field of flowers"
            box = (0.1 + 0.05 * i, 0.2, 0.6, 0.9)
            spans = [(0, 5, [box]), (11, 16, [(0.0, 0.5, 1.0, 1.0)])]
            entries = [[0, 5, *box, 0.9], [11, 16, 0.0, 0.5, 1.0, 1.0, 0.8]]
            rows.append({"key": f"0000{i:05d}", "url": f"https://example.com/{i}.jpg", "caption": caption,
                         "width": 48, "height": 32, "noun_chunks": entries, "ref_exps": entries,
                         "grounded_caption": build_grounded_caption(caption, spans),
                         "markdown_caption": build_markdown_caption(caption, spans),
                         "id": i, "clip_similarity_vitb32": 0.3})
            refs.append({"key": f"0000{i:05d}", "image_ref": f"tar://0000{i:05d}.jpg::{tar_path}"})
    schema = pa.schema(GRIT_FIELDS + [pa.field("id", pa.int64()), pa.field("clip_similarity_vitb32", pa.float64())])
    run = tmp_path / "run"
    (run / "grit").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), run / "grit" / "shard-00000.parquet")
    (run / "run.yaml").write_text(yaml.safe_dump({"run": {"input": str(tar_path.parent)},
                                                  "fingerprints": {"ingest": "fp2", "compose": "fp9"}}))
    for fp, table in (("fp2", refs), ("fp1", [{"key": r["key"], "image_ref": "gone.jpg"} for r in refs])):
        (run / "stages" / "ingest" / fp).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(table), run / "stages" / "ingest" / fp / "shard-00000.parquet")
    return run


def test_trainer_reads_pipeline_run_directories(tmp_path):
    run = _pipeline_like_run(tmp_path)
    result = train(str(run), str(tmp_path / "train"), tiny_config(steps=2, on_missing_image="error",
                                                                  grounding_fraction=1.0), progress=False)
    assert result["steps"] == 2
    export = export_kosmos2(str(run), str(tmp_path / "export"))
    assert export["rows"] == 6 and export["missing_images"] == 0
    figures = evaluate(str(tmp_path / "train"), str(run / "grit" / "shard-00000.parquet"))
    assert figures["rows"] == 6 and figures["phrases"] == 12


@pytest.mark.ray
@pytest.mark.slow
def test_trainer_reads_make_demo_output(tmp_path):
    from grit_pipeline.demo import run_demo

    demo = run_demo(tmp_path / "demo-run", report=False, progress=False)
    assert demo.ok, demo.problems
    result = train(str(demo.run_dir), str(tmp_path / "train"),
                   tiny_config(steps=2, on_missing_image="error", grounding_fraction=1.0), progress=False)
    assert result["steps"] == 2
    figures = evaluate(str(tmp_path / "train"), str(demo.run_dir))
    assert figures["rows"] == demo.rows and figures["phrases"] > 0
    export = export_kosmos2(str(demo.run_dir), str(tmp_path / "export"))
    assert export["rows"] == demo.rows and export["missing_images"] == 0


# --- CLI --------------------------------------------------------------------------------------------------


def test_cli_synth_train_eval_export(tmp_path):
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"model": TINY_MODEL, "tokenizer": "bpe", "bpe_vocab_size": 1320,
                                   "batch_size": 4, "num_workers": 0, "torch_threads": 1, "warmup_steps": 1}))

    def ok(*args):
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output + repr(r.exception)
        return r

    ok("synth", "--out", tmp_path / "train", "--shards", 2, "--rows", 6, "--seed", 0)
    ok("synth", "--out", tmp_path / "heldout", "--shards", 1, "--rows", 4, "--seed", 1, "--embed-images")
    ok("train", "--data", tmp_path / "train", "--out", tmp_path / "run", "-c", cfg, "--steps", 3,
       "--device", "cpu", "lr=0.002")
    assert json.loads((tmp_path / "run" / "checkpoints" / "step-0000003" / "config.json").read_text())["lr"] == 0.002
    ok("eval", "--data", tmp_path / "heldout", "--ckpt", tmp_path / "run", "--out", tmp_path / "eval.json",
       "--device", "cpu")
    figures = json.loads((tmp_path / "eval.json").read_text())
    assert figures["rows"] == 4 and "baseline_train_mean_box_accuracy" in figures
    ok("export", "--data", tmp_path / "heldout", "--out", tmp_path / "export", "--format", "parquet")
    assert pq.read_table(tmp_path / "export" / "data-00000.parquet").num_rows == 4
