"""The trainer's input side: tokenizer, image lookup, and the sharded, shuffled streaming dataset."""

import io
import os
import tarfile
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from grit_pipeline.train import vocab
from grit_pipeline.train.dataset import (
    IGNORE_INDEX,
    GritStreamingDataset,
    SequenceLayout,
    assign_shards,
    build_sequence,
    collate,
    list_shards,
)
from grit_pipeline.train.images import ImageUnavailable, decode_image, read_image_bytes
from grit_pipeline.train.testing import tiny_shards
from grit_pipeline.train.tokenizer import GroundedTokenizer
from schemas.grounded_text import build_grounded_caption, build_markdown_caption
from schemas.tables import GRIT_SCHEMA

GROUNDED = "<grounding><phrase> a dog</phrase><object><patch_index_0288><patch_index_0990></object> in a field"
LAYOUT = SequenceLayout(num_image_tokens=4, max_text_tokens=64)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return tiny_shards(str(root), shards=6, rows=7)


@pytest.fixture(scope="module")
def tok():
    return GroundedTokenizer.byte_level()


# --- tokenizer ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_tokenizer_keeps_tags_and_locations_atomic_at_fixed_ids(kind):
    captions = ["a red circle to the left of a blue square", "a dog in a field"] * 30
    tok = GroundedTokenizer.byte_level() if kind == "byte" else GroundedTokenizer.train(captions, 1400)
    ids = tok.encode(GROUNDED)
    assert ids[:2] == [tok.grounding_id, tok.phrase_start_id]
    assert tok.location_id(288) in ids and tok.location_id(990) in ids
    assert ids[ids.index(tok.object_start_id) + 1: ids.index(tok.object_end_id)] == \
        [vocab.LOCATION_OFFSET + 288, vocab.LOCATION_OFFSET + 990]
    assert tok.decode(ids) == GROUNDED
    for i, t in enumerate(vocab.SPECIAL_TOKENS):
        assert tok.encode(t) == [i]


def test_bpe_training_is_deterministic_and_saves(tmp_path):
    captions = [f"a {c} circle above a {d} square" for c in ("red", "blue") for d in ("green", "orange")] * 20
    a = GroundedTokenizer.train(captions, 1400)
    b = GroundedTokenizer.train(captions, 1400)
    assert a.to_json() == b.to_json()
    assert len(a.encode("a red circle above a green square")) < len(GroundedTokenizer.byte_level().encode(
        "a red circle above a green square"))
    a.save(str(tmp_path / "tok.json"))
    assert GroundedTokenizer.load(str(tmp_path / "tok.json")).encode(GROUNDED) == a.encode(GROUNDED)


def test_foreign_tokenizer_is_refused():
    from tokenizers import Tokenizer, models

    with pytest.raises(ValueError, match="not built by"):
        GroundedTokenizer(Tokenizer(models.BPE()))


# --- sequence layout -------------------------------------------------------------------------------------


def test_sequence_has_image_slots_and_loss_only_on_caption(tok):
    ids, labels = build_sequence(tok, GROUNDED, LAYOUT)
    assert ids[:2] == [tok.bos_id, tok.image_start_id]
    assert ids[2:6] == [tok.image_pad_id] * 4 and ids[6] == tok.image_end_id
    assert ids[7] == tok.grounding_id and ids[-1] == tok.eos_id
    assert all(x == IGNORE_INDEX for x in labels[:8])  # image part and <grounding>
    assert labels[8:] == ids[8:]
    plain_ids, plain_labels = build_sequence(tok, "a dog in a field", LAYOUT)
    assert plain_labels[7:] == plain_ids[7:] and tok.grounding_id not in plain_ids


# --- images ----------------------------------------------------------------------------------------------


def _png(colour=(255, 0, 0), size=(20, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_image_sources_in_order(tmp_path):
    data = _png()
    (tmp_path / "img.png").write_bytes(data)
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        info = tarfile.TarInfo("000000001.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    shard = str(tmp_path / "shard-00000.parquet")
    assert read_image_bytes({"key": "k", "image_bytes": data, "url": "http://x/y.jpg"}, shard) == data
    assert read_image_bytes({"key": "k", "url": "img.png"}, shard) == data  # relative to the shard
    assert read_image_bytes({"key": "k", "url": str(tmp_path / "img.png")}, shard) == data
    assert read_image_bytes({"key": "k", "url": f"file://{tmp_path}/img.png"}, shard) == data
    assert read_image_bytes({"key": "k", "url": f"tar://000000001.jpg::{tmp_path}/00000.tar"}, shard) == data
    assert read_image_bytes({"key": "k", "url": "tar://000000001.jpg::00000.tar"}, shard) == data
    assert read_image_bytes({"key": "k", "image_ref": "img.png", "url": "http://example.com/a.jpg"}, shard) == data
    with pytest.raises(ImageUnavailable, match=r"key 'k9'.*image_web_url.*never fetches"):
        read_image_bytes({"key": "k9", "url": "https://example.com/a.jpg"}, shard)
    with pytest.raises(ImageUnavailable, match="k8"):
        read_image_bytes({"key": "k8", "url": "missing.png"}, shard)


def test_image_ref_locations_are_read_as_ranges(tmp_path):
    """With ingest's `image_offset`/`image_size` the trainer reads exactly those bytes of the tar."""
    first, second = _png((255, 0, 0)), _png((0, 0, 255), (30, 12))
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in (("a.png", first), ("b.png", second)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(tmp_path / "00000.tar") as tar:
        b = tar.getmember("b.png")
    shard = str(tmp_path / "shard-00000.parquet")
    row = {"key": "k", "image_ref": "tar://a.png::00000.tar"}
    assert read_image_bytes(row, shard) == first  # no location: found by name in the tar's headers
    assert read_image_bytes({**row, "image_offset": b.offset_data, "image_size": b.size}, shard) == second


def test_decode_refuses_a_decompression_bomb():
    # 10,000 x 9,000 = 9e7 pixels: over the pipeline's limit (89,478,485) yet under the 2x at which PIL
    # itself refuses, so PIL's defaults would decode all of it
    buf = io.BytesIO()
    Image.new("1", (10_000, 9_000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 200_000
    with pytest.raises(ImageUnavailable, match="image_too_large: 10000x9000"):
        decode_image(buf.getvalue(), 16)


def test_decode_refuses_corrupt_and_tiny_images():
    with pytest.raises(ImageUnavailable, match="image_decode_error"):
        decode_image(_png()[:40], 16)
    with pytest.raises(ImageUnavailable, match="image_too_small"):
        decode_image(_png(size=(4, 40)), 16)


def test_decode_resizes_to_square_in_range():
    t = decode_image(_png((255, 0, 0), (20, 10)), 16)
    assert t.shape == (3, 16, 16)
    assert torch.allclose(t[0], torch.ones(16, 16)) and torch.allclose(t[1], -torch.ones(16, 16))


# --- streaming dataset -----------------------------------------------------------------------------------


def test_list_shards_accepts_folder_glob_file_and_run_dir(shards, tmp_path):
    folder = os.path.dirname(shards[0].removeprefix("file://"))
    assert list_shards(folder) == shards
    assert list_shards(folder + "/shard-0000[01].parquet") == shards[:2]
    assert list_shards(f"{shards[0]},{shards[3]}") == [shards[0], shards[3]]
    run = tmp_path / "run" / "grit"
    run.mkdir(parents=True)
    pq.write_table(GRIT_SCHEMA.empty_table(), run / "shard-00000.parquet")
    pq.write_table(pa.table({"key": ["x"]}), run / "shard-00000.rejects.parquet")
    assert list_shards(str(tmp_path / "run")) == [f"file://{run}/shard-00000.parquet"]
    with pytest.raises(FileNotFoundError):
        list_shards(str(tmp_path / "nothing"))


def test_assign_shards_partitions_every_epoch(shards):
    for epoch in range(3):
        parts = [assign_shards(shards, 0, epoch, r, 4) for r in range(4)]
        assert sorted(s for p in parts for s in p) == sorted(shards)
    assert assign_shards(shards, 0, 0, 0, 4) != assign_shards(shards, 0, 1, 0, 4) or \
        assign_shards(shards, 0, 0, 1, 4) != assign_shards(shards, 0, 1, 1, 4)


def _keys(ds: GritStreamingDataset, workers: int) -> list[str]:
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    return [s["key"] for s in loader]


def _dataset(shards, tok, **kw) -> GritStreamingDataset:
    kw.setdefault("shuffle_buffer", 5)
    return GritStreamingDataset(shards, tok, LAYOUT, image_size=16, **kw)


def test_two_ranks_by_two_workers_read_disjoint_shards_and_all_rows(shards, tok):
    all_keys = sorted(r["key"] for s in shards for r in pq.read_table(s.removeprefix("file://"), columns=["key"]).to_pylist())
    per_rank = [_keys(_dataset(shards, tok, rank=r, world_size=2), workers=2) for r in range(2)]
    got = per_rank[0] + per_rank[1]
    assert sorted(got) == all_keys  # every row once: no duplicates, nothing missing
    shard_of = lambda k: k.rsplit("-", 1)[0]  # noqa: E731  synth keys are <seed>-<shard>-<row>
    rank_shards = [set(map(shard_of, keys)) for keys in per_rank]
    assert rank_shards[0].isdisjoint(rank_shards[1]) and all(rank_shards)
    # the four readers' shard lists, as the workers compute them, partition the shards
    readers = [assign_shards(shards, 0, 0, w * 2 + r, 4) for r in range(2) for w in range(2)]
    assert sorted(s for part in readers for s in part) == sorted(shards)
    assert Counter(shard_of(k) for k in got) == Counter({shard_of(k): 7 for k in all_keys})


def test_shuffle_is_seeded_per_epoch(shards, tok):
    ds = _dataset(shards, tok)
    first = _keys(ds, 0)
    assert _keys(_dataset(shards, tok), 0) == first
    ds.set_epoch(1)
    second = _keys(ds, 0)
    assert sorted(second) == sorted(first) and second != first
    assert _keys(_dataset(shards, tok, seed=5), 0) != first
    assert _keys(_dataset(shards, tok, shuffle_buffer=1), 0) != first  # the buffer does shuffle


def test_grounding_fraction_picks_grounded_or_plain_text(shards, tok):
    def grounded_share(fraction):
        samples = list(_dataset(shards, tok, grounding_fraction=fraction))
        return sum(s["input_ids"][LAYOUT.num_image_tokens + 3] == tok.grounding_id for s in samples) / len(samples)

    assert grounded_share(1.0) == 1.0 and grounded_share(0.0) == 0.0
    assert 0.2 < grounded_share(0.5) < 0.8


def test_unreadable_image_skips_that_row_or_raises(tmp_path, tok):
    rows = []
    for i in range(3):
        caption = "a red square"
        spans = [(0, len(caption), [(0.1, 0.1, 0.5, 0.5)])]
        rows.append({"key": f"k{i}", "url": "img.png" if i != 1 else "gone.png", "caption": caption, "width": 20,
                     "height": 10, "noun_chunks": [[0, 12, 0.1, 0.1, 0.5, 0.5, 0.9]],
                     "ref_exps": [[0, 12, 0.1, 0.1, 0.5, 0.5, 0.9]],
                     "grounded_caption": build_grounded_caption(caption, spans),
                     "markdown_caption": build_markdown_caption(caption, spans)})
    (tmp_path / "img.png").write_bytes(_png())
    pq.write_table(pa.Table.from_pylist(rows, schema=GRIT_SCHEMA), tmp_path / "shard-00000.parquet")
    found = list_shards(str(tmp_path))
    assert [s["key"] for s in _dataset(found, tok, shuffle_buffer=1)] == ["k0", "k2"]
    with pytest.raises(ImageUnavailable, match="k1"):
        list(_dataset(found, tok, on_missing_image="error"))


def test_collate_pads_right(tok):
    a = {"key": "a", "pixel_values": torch.zeros(3, 16, 16), "input_ids": [1, 2, 3], "labels": [-100, 2, 3]}
    b = {"key": "b", "pixel_values": torch.ones(3, 16, 16), "input_ids": [1, 2], "labels": [-100, 2]}
    batch = collate([a, b], pad_id=tok.pad_id)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, 2, tok.pad_id]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, 2, IGNORE_INDEX]]
    assert batch["keys"] == ["a", "b"] and batch["pixel_values"].shape == (2, 3, 16, 16)


def test_more_ranks_than_shards_is_a_clear_error(shards, tok):
    with pytest.raises(ValueError, match="cannot feed"):
        _dataset(shards[:1], tok, rank=0, world_size=2)
