"""Stage-level reliability: the bad-input corpus through the five stages in-process (no Ray).

Every bad row must end as a reject of the stage and reason its corpus entry names, every good row (and
every valid oddity: CMYK, 16-bit, palette, EXIF-rotated, emoji, right-to-left, `[x](y)`) must reach
compose's output, and every stage must account for each input row exactly once.
"""

from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from corpus import KEPT, Outcome, mismatches, outcomes_of, write_corpus
from stagewise import DECODE_CONFIG

from schemas.grounded_text import parse_grounded_caption, parse_markdown_caption
from schemas.rows import GritRow
from schemas.tables import GRIT_SCHEMA
from stages.detect import IMG_H, IMG_W, PIX_H, PIX_W, PIXELS, DetectStage
from stages.ingest import IngestConfig, IngestStage
from stages.registry import STAGE_ORDER
from stages.sources import SourceSchemaError


def test_corpus_is_byte_identical_for_the_same_seed(tmp_path):
    write_corpus(tmp_path / "a")
    write_corpus(tmp_path / "b")
    names = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", [str(n) for n in names], shallow=False)
    assert mismatch == [] and errors == []


def test_corpus_holds_every_required_case(corpus):
    cases = {r.case for r in corpus.rows}
    for required in ("image:truncated_jpeg", "image:zero_byte_jpeg", "image:garbage_jpeg",
                     "image:png_header_30000x30000", "image:cmyk_jpeg", "image:16bit_png",
                     "image:palette_transparency_png", "image:1x1", "image:exif_rotated_jpeg",
                     "image:missing_tar_member", "image:tar_cut_short", "image:after_the_tar_cut", "caption:empty", "caption:whitespace", "caption:10000_chars",
                     "caption:emoji", "caption:right_to_left", "caption:phrase_tag",
                     "caption:patch_index_token", "caption:markdown_link", "caption:control_chars",
                     "caption:c1_controls", "caption:bidi_override", "caption:only_control_chars",
                     "data:duplicate_key#1",
                     "data:wrong_schema_shard", "data:replay_nan_box", "data:replay_inf_box",
                     "data:replay_negative_box", "data:replay_inverted_box"):
        assert required in cases
    assert corpus.ghost_keys
    for shard in corpus.shards:  # bad rows sit between good neighbours in every shard
        assert any(r.case == "good" or r.case == "data:wrong_schema_shard" for r in corpus.rows if r.shard == shard)


@pytest.mark.parametrize("mode", ["full", "replay"])
def test_every_row_ends_where_the_corpus_says(corpus, mode, request):
    run = request.getfixturevalue(f"stagewise_{mode}")
    actual = outcomes_of(run.final(), run.all_rejects())
    expected = {k: v for k, v in corpus.expected(mode).items() if k[0] != corpus.bad_shard}
    assert mismatches(expected, actual, corpus.rows) == []
    kept = [r for r in corpus.rows if r.expect(mode) == KEPT]
    assert len(kept) >= 20 and run.final().num_rows == len(kept)


def test_valid_oddities_survive_every_stage(corpus, stagewise_full):
    final_keys = set(stagewise_full.final()["key"].to_pylist())
    by_case = corpus.rows_by_case()
    for case in ("image:cmyk_jpeg", "image:16bit_png", "image:palette_transparency_png", "image:exif_rotated_jpeg",
                 "caption:emoji", "caption:right_to_left", "caption:markdown_link", "data:duplicate_key#0",
                 "data:replay_half_bad_boxes"):
        assert by_case[case].key in final_keys, case


def test_every_stage_accounts_for_each_input_row(stagewise_full):
    for shard, run in stagewise_full.shards.items():
        for i, name in enumerate(STAGE_ORDER):
            out, rej = run.outputs[name], run.rejects[name]
            assert run.inputs[name] == out.num_rows + rej.num_rows, (shard, name)
            assert set(out["key"].to_pylist()).isdisjoint(rej["key"].to_pylist()) or name == "ingest"
            assert set(rej["stage"].to_pylist()) <= {name}
            if i + 1 < len(STAGE_ORDER):
                assert run.inputs[STAGE_ORDER[i + 1]] == out.num_rows


def test_wrong_schema_shard_fails_naming_its_file_and_the_column(corpus, stagewise_full):
    assert set(stagewise_full.failures) == {corpus.bad_shard}
    message = stagewise_full.failures[corpus.bad_shard]
    assert f"{corpus.bad_shard:05d}.parquet" in message and "caption" in message
    ingest = IngestStage(IngestConfig(format="img2dataset"))
    bad = next(s for s in ingest.discover(str(corpus.root)) if s.index == corpus.bad_shard)
    with pytest.raises(SourceSchemaError, match="00003.parquet"):
        ingest.read(bad)


def test_reject_details_say_what_was_wrong(corpus, stagewise_full):
    rejects = {(r["shard"], r["key"], r["reason"]): r["detail"] for r in stagewise_full.all_rejects().to_pylist()}
    by_case = corpus.rows_by_case()

    def detail(case: str) -> str:
        row = by_case[case]
        return rejects[(row.shard, row.key, row.expect("full").reason)]

    assert "0 bytes" in detail("image:zero_byte_jpeg")
    assert "900000000" in detail("image:png_header_30000x30000")
    assert "1x1" in detail("image:1x1")
    cut = by_case["image:tar_cut_short"]
    assert f"{cut.key}.jpg" in detail("image:tar_cut_short") and "00000.tar" in detail("image:tar_cut_short")
    assert "00000.tar" in detail("image:after_the_tar_cut")
    assert "<phrase>" in detail("caption:phrase_tag")
    assert "10000" in detail("caption:10000_chars")
    assert "non_finite" in detail("data:replay_nan_box") and "non_finite" in detail("data:replay_inf_box")
    assert "box_out_of_range" in detail("data:replay_negative_box")
    assert "box_inverted" in detail("data:replay_inverted_box")
    assert "HTTP 404" in detail("data:download_failed")


def test_final_rows_are_valid_grit_rows_whose_captions_parse_back(corpus, stagewise_full):
    by_key = {r.key: r for r in corpus.rows}
    for run in stagewise_full.shards.values():
        table = run.outputs["compose"]
        assert table.schema.names[: len(GRIT_SCHEMA)] == GRIT_SCHEMA.names
        for row in table.to_pylist():
            grit = GritRow.model_validate(row)
            assert grit.caption == by_key[row["key"]].final_caption
            assert parse_markdown_caption(grit.markdown_caption).caption == grit.caption
            assert parse_grounded_caption(grit.grounded_caption).caption == grit.caption
            assert grit.noun_chunks


def test_replayed_boxes_for_unknown_keys_never_surface(corpus, stagewise_full):
    seen = set(stagewise_full.final()["key"].to_pylist()) | set(stagewise_full.all_rejects()["key"].to_pylist())
    assert seen.isdisjoint(corpus.ghost_keys)


def test_replay_backend_rejects_broken_images_as_a_pixel_detector_does(corpus, stagewise_replay):
    """`detect.check_images`: with the replay backend broken images never reach the final shards; they
    are rejected by detect with the reasons a pixel detector gives."""
    final = set(stagewise_replay.final()["key"].to_pylist())
    rejects = {(r["shard"], r["key"]): Outcome(r["stage"], r["reason"])
               for r in stagewise_replay.all_rejects().to_pylist()}
    broken = [r for r in corpus.rows if any(p.phase == "image" for p in r.problems)]
    assert {r.expect("decode").reason for r in broken} >= {"image_decode_error", "image_too_large",
                                                           "image_too_small", "image_unreadable"}
    for r in broken:
        assert r.key not in final and rejects[(r.shard, r.key)] == r.expect("decode"), r.case


def test_decoding_brings_valid_oddities_to_rgb_at_their_oriented_size(corpus):
    ingest = IngestStage(IngestConfig(format="img2dataset"))
    shard0 = next(s for s in ingest.discover(str(corpus.root)) if s.index == 0)
    table = ingest.process_batch(ingest.read(shard0)).output
    prepared = DetectStage(DECODE_CONFIG.model_copy(update={"input_size": 48})).prepare_batch(table).output
    rows = {r["key"]: r for r in prepared.select(["key", PIXELS, PIX_H, PIX_W, IMG_W, IMG_H]).to_pylist()}
    by_case = corpus.rows_by_case()

    def pixels(case: str) -> np.ndarray:
        r = rows[by_case[case].key]
        return np.frombuffer(r[PIXELS], np.uint8).reshape(r[PIX_H], r[PIX_W], 3)

    exif = rows[by_case["image:exif_rotated_jpeg"].key]
    assert (exif[IMG_W], exif[IMG_H]) == (48, 64)  # stored 64x48, displayed rotated by 90 degrees
    assert pixels("image:exif_rotated_jpeg").shape[:2] == (64, 48)  # shorter side 48
    sixteen = pixels("image:16bit_png")
    assert int(sixteen.max()) - int(sixteen.min()) > 200  # 16-bit values scaled to 8 bits, not clipped
    assert pixels("image:cmyk_jpeg").std() > 0
    palette = pixels("image:palette_transparency_png")
    assert (palette == 255).all(axis=2).any()  # transparent index composited on white
    assert pa.types.is_large_binary(prepared.schema.field(PIXELS).type)


def test_corpus_expectations_are_written_next_to_it(corpus):
    import json

    written = json.loads((Path(corpus.root).parent / "expected.json").read_text())
    assert [(w["shard"], w["key"], w["full"]) for w in written] == \
        [(r.shard, r.key, str(r.expect("full"))) for r in corpus.rows]
