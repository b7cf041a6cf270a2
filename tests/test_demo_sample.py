"""The bundled demo sample (`grit_pipeline/assets/demo/`): small, rebuilt byte for byte by its script,
readable by `ingest` as img2dataset output, and its annotations fit what the pipeline's stages see."""

from __future__ import annotations

import io
import tarfile

import fsspec
import pyarrow.parquet as pq
import pytest
from PIL import Image

from grit_pipeline.assets.build_demo_sample import (
    DEMO_DIR,
    DETECTIONS,
    SHARDS_DIR,
    build,
    load_annotations,
    phrase_span,
)
from stages.detectors.base import ChunkPrompt, ImageInput
from stages.detectors.replay import ReplayDetector
from stages.ingest import IngestConfig, IngestStage

ROWS = load_annotations()
COMMITTED = [p for p in sorted(DEMO_DIR.rglob("*")) if p.is_file() and p.suffix in (".tar", ".parquet", ".json")]


def test_sample_is_small_and_has_enough_scenes():
    assert sum(p.stat().st_size for p in COMMITTED) < 2_000_000
    scenes = {r.scene for r in ROWS if r.image is not None}
    assert len(scenes) >= 6
    assert {r.shard for r in ROWS} == {0, 1}


def test_build_script_reproduces_the_committed_sample(tmp_path):
    written = build(tmp_path)
    assert sorted(p.relative_to(tmp_path) for p in written) == sorted(p.relative_to(DEMO_DIR) for p in COMMITTED)
    for path in written:
        committed = DEMO_DIR / path.relative_to(tmp_path)
        if path.suffix == ".parquet":  # compare contents: the writer's version is in the file footer
            assert pq.read_table(path).equals(pq.read_table(committed)), path.name
        else:
            assert path.read_bytes() == committed.read_bytes(), path.name


def test_ingest_reads_the_sample_as_img2dataset_output():
    stage = IngestStage(IngestConfig())
    source = str(DEMO_DIR / SHARDS_DIR)
    assert stage.source_format(source) == "img2dataset"
    shards = stage.discover(source)
    assert [s.index for s in shards] == [0, 1]
    by_key = {r.key: r for r in ROWS}
    seen = set()
    for shard in shards:
        result = stage.process_batch(stage.read(shard))
        rejects = dict(zip(result.rejects["key"].to_pylist(), result.rejects["reason"].to_pylist(), strict=True))
        for key, reason in rejects.items():
            assert by_key[key].expect_reject == {"stage": "ingest", "reason": reason}
        for out in result.output.to_pylist():
            seen.add(out["key"])
            row = by_key[out["key"]]
            assert out["caption"] == row.caption and out["scene"] == row.scene
            # image_ref is a webdataset member that fsspec opens and PIL decodes at the recorded size
            assert out["image_ref"].startswith(f"tar://{out['key']}.jpg::")
            with fsspec.open(out["image_ref"], "rb") as f:
                assert Image.open(io.BytesIO(f.read())).size == (out["width"], out["height"])
    expected = {r.key for r in ROWS if not (r.expect_reject and r.expect_reject["stage"] == "ingest")}
    assert seen == expected


def test_failed_download_has_metadata_but_no_image():
    failed = [r for r in ROWS if r.status != "success"]
    assert failed
    for row in failed:
        meta = pq.read_table(DEMO_DIR / SHARDS_DIR / f"{row.shard:05d}.parquet").to_pylist()
        (rec,) = [m for m in meta if m["key"] == row.key]
        assert rec["status"] == "failed_to_download" and rec["error_message"]
        with tarfile.open(DEMO_DIR / SHARDS_DIR / f"{row.shard:05d}.tar") as tar:
            assert not [n for n in tar.getnames() if n.startswith(row.key)]


def test_replay_file_gives_every_annotated_box_to_its_chunk():
    detector = ReplayDetector(path=str(DEMO_DIR / DETECTIONS), floor=0.1)
    for row in ROWS:
        if not row.phrases:
            continue
        spans = sorted({phrase_span(row.caption, p["text"]) for p in row.phrases})
        (det,) = detector.detect([ImageInput(row.key)], [ChunkPrompt.from_caption(row.caption, spans)])
        got = {(spans[c], tuple(b)) for c, b in zip(det.chunk.tolist(), det.xyxy.tolist(), strict=True)}
        for p in row.phrases:
            for box in p["boxes"]:
                assert (phrase_span(row.caption, p["text"]), tuple(box)) in got


@pytest.fixture(scope="module")
def chunker():
    from stages.chunks import ChunksStage

    stage = ChunksStage()
    stage.setup()
    return stage


def test_annotated_phrases_are_the_noun_chunks_spacy_finds(chunker):
    """The replay entries are keyed by char span: each annotated phrase must be one of the chunk spans the
    chunks stage produces, with the referring expression the annotations expect (when tagged)."""
    import pyarrow as pa

    rows = [r for r in ROWS if r.phrases]
    result = chunker.process_batch(pa.table({"key": [r.key for r in rows], "caption": [r.caption for r in rows]}))
    chunks = dict(zip(result.output["key"].to_pylist(), result.output["chunks"].to_pylist(), strict=True))
    for row in rows:
        by_span = {(c["start"], c["end"]): c for c in chunks[row.key]}
        for p in row.phrases:
            span = phrase_span(row.caption, p["text"])
            assert span in by_span, (row.caption, p["text"], list(by_span))
            c = by_span[span]
            if p["expression"] is not None:
                assert row.caption[c["expr_start"]:c["expr_end"]] == p["expression"]
