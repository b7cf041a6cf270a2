"""`grit synth`: procedural GrIT shards are schema-valid, exact, and deterministic from the seed."""

import io
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from grit_pipeline.train.synth import COLOURS, SynthConfig, make_scene, synth_shard, write_synth
from schemas.grounded_text import parse_grounded_caption, parse_markdown_caption
from schemas.location import encode_box
from schemas.rows import GritRow
from schemas.tables import GRIT_SCHEMA


@pytest.fixture(scope="module")
def shard_table():
    table, images = synth_shard(SynthConfig(rows_per_shard=60, seed=3, min_side=48, max_side=96), 0)
    return table, images


def test_schema_is_grit_and_rows_validate(shard_table):
    table, _ = shard_table
    assert table.schema.equals(GRIT_SCHEMA)
    for row in table.to_pylist():
        GritRow.model_validate(row)


def test_grounded_and_markdown_captions_parse_back_to_the_noun_chunks(shard_table):
    table, _ = shard_table
    for row in table.to_pylist():
        for parsed in (parse_grounded_caption(row["grounded_caption"]), parse_markdown_caption(row["markdown_caption"])):
            assert parsed.caption == row["caption"]
            assert [(s.start, s.end) for s in parsed.spans] == [(int(e[0]), int(e[1])) for e in row["noun_chunks"]]
            assert [s.boxes[0] for s in parsed.spans] == [encode_box(e[2:6]) for e in row["noun_chunks"]]
        for e in row["noun_chunks"]:
            words = row["caption"][int(e[0]):int(e[1])].split()
            assert words[0] in ("a", "an") and words[1] in COLOURS and words[2] in ("circle", "square", "triangle")


def test_boxes_are_exact_to_the_pixel(shard_table):
    table, images = shard_table
    for row in table.to_pylist()[:20]:
        im = np.asarray(Image.open(io.BytesIO(images[row["url"]])).convert("RGB")).astype(int)
        h, w, _ = im.shape
        assert (w, h) == (row["width"], row["height"])
        for e in row["noun_chunks"]:
            colour = COLOURS[row["caption"][int(e[0]):int(e[1])].split()[1]]
            ys, xs = np.nonzero(np.abs(im - colour).sum(-1) == 0)
            # shapes in one scene have distinct colour-shape pairs but may share a colour: restrict to the box
            x0, y0, x1, y1 = round(e[2] * w), round(e[3] * h), round(e[4] * w), round(e[5] * h)
            inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
            assert inside.any()
            xs, ys = xs[inside], ys[inside]
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)


def test_captions_describe_the_layout():
    rng = random.Random(7)
    cfg = SynthConfig(min_objects=2, max_objects=2)
    seen = set()
    for _ in range(200):
        scene = make_scene(rng, cfg)
        if len(scene.spans) != 2:
            continue
        (_, a_end, a), (b_start, _, b) = scene.spans
        relation = scene.caption[a_end:b_start].strip()
        seen.add(relation)
        ax, ay, bx, by = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2, (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        expected = {"to the left of": ax < bx, "to the right of": ax >= bx, "above": ay < by, "below": ay >= by}
        assert expected[relation], (scene.caption, a, b)
    assert seen == {"to the left of", "to the right of", "above", "below"}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    cfg = SynthConfig(shards=2, rows_per_shard=5, seed=11, min_side=40, max_side=48)
    a = write_synth(str(tmp_path / "a"), cfg)
    b = write_synth(str(tmp_path / "b"), cfg)
    c = write_synth(str(tmp_path / "c"), cfg.model_copy(update={"seed": 12}))
    for pa_, pb in zip(a, b, strict=True):
        assert open(pa_.removeprefix("file://"), "rb").read() == open(pb.removeprefix("file://"), "rb").read()
    assert pq.read_table(a[0].removeprefix("file://"))["caption"].to_pylist() != \
        pq.read_table(c[0].removeprefix("file://"))["caption"].to_pylist()
    assert sorted(p.name for p in (tmp_path / "a" / "images" / "shard-00000").iterdir()) == \
        sorted(f"synth11-00000-{i:05d}.png" for i in range(5))


def test_embed_images_adds_image_bytes(tmp_path):
    path = write_synth(str(tmp_path), SynthConfig(shards=1, rows_per_shard=3, embed_images=True,
                                                  min_side=40, max_side=48))[0]
    table = pq.read_table(path.removeprefix("file://"))
    assert table.schema.names == list(GRIT_SCHEMA.names) + ["image_bytes"]
    for row in table.to_pylist():
        assert row["image_bytes"] == (tmp_path / row["url"]).read_bytes()
