"""The model backends' real code paths on tiny random models built from configs: transformers
GroundingDINO and OWLv2, and the official GroundingDINO package (SwinT config, tiny local BERT).

Random weights give meaningless boxes, so these tests check what does not depend on training: the
plumbing (shapes, masks, token -> chunk mapping, caption and chunk prompts, windows and splitting, box
coordinates) and that batching gives each image the result it gets alone (batches hold one pixel size,
so no image is padded; text padding is masked)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import io
import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from schemas.tables import CHUNK_TYPE, DETECT_SCHEMA
from stages.detect import DetectConfig, DetectStage
from stages.detectors import tiny
from stages.detectors.base import ChunkPrompt, ImageInput
from stages.detectors.batching import pad_images
from stages.detectors.config import DetectExecution
from stages.detectors.grounding import TokenGroundingDetector
from stages.detectors.groundingdino_official import fix_text_mask_order
from stages.detectors.hf import HFOwlv2, hf_post_process, load_hf_detector

CAPTION = "a dog in a field of flowers"
SPANS = [(0, 5), (9, 16), (20, 27)]
PROMPT = ChunkPrompt.from_caption(CAPTION, SPANS)

CPU = DetectExecution(device="cpu", gpus=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"gd": tiny.hf_grounding_dino(root / "gd"), "owl": tiny.hf_owlv2(root / "owl"),
            "bert": tiny.tiny_bert(root / "bert")}


def rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def same(a, b, atol=1e-5):
    """Two Detections agree entry for entry."""
    assert a.chunk.tolist() == b.chunk.tolist() and a.box.tolist() == b.box.tolist()
    np.testing.assert_allclose(a.xyxy, b.xyxy, atol=atol)
    np.testing.assert_allclose(a.score, b.score, atol=atol)
    np.testing.assert_allclose(a.box_score, b.box_score, atol=atol)


def box_table(scores, xyxy) -> np.ndarray:
    """(score, x1, y1, x2, y2) rows in a canonical order, for comparing entries whose box ids differ."""
    rows = np.column_stack([np.asarray(scores, np.float64), np.asarray(xyxy, np.float64)])
    return rows[np.lexsort(np.round(rows, 4).T[::-1])]


def assert_same_entries(a, chunk_a, b, chunk_b, atol=1e-4):
    ka, kb = a.chunk == chunk_a, b.chunk == chunk_b
    assert ka.sum() == kb.sum() > 0
    np.testing.assert_allclose(box_table(a.score[ka], a.xyxy[ka]), box_table(b.score[kb], b.xyxy[kb]), atol=atol)


def check_candidates(dets, n_chunks, cap):
    assert 0 < len(dets) <= cap
    assert ((dets.chunk >= -1) & (dets.chunk < n_chunks)).all()
    assert ((dets.xyxy >= 0) & (dets.xyxy <= 1)).all()
    assert (dets.xyxy[:, 2] > dets.xyxy[:, 0]).all() and (dets.xyxy[:, 3] > dets.xyxy[:, 1]).all()
    assert sorted(set(dets.box.tolist())) == list(range(len(set(dets.box.tolist()))))
    order = np.lexsort((dets.chunk, dets.box))
    assert (order == np.arange(len(dets))).all()


def chunk(s, e):
    return {"start": s, "end": e, "root_start": s, "root_end": e, "expr_start": s, "expr_end": e, "has_conj": False}


def image_table(tmp_path, sizes) -> pa.Table:
    refs = []
    for i, (w, h) in enumerate(sizes):
        path = tmp_path / f"img{i}.jpg"
        Image.fromarray(rgb(h, w, i)).save(path)
        refs.append(str(path))
    n = len(sizes)
    return pa.table({"key": [f"k{i}" for i in range(n)], "caption": [CAPTION] * n, "image_ref": refs,
                     "chunks": pa.array([[chunk(s, e) for s, e in SPANS]] * n, pa.list_(CHUNK_TYPE))})


# --- transformers GroundingDINO ----------------------------------------------------------------------


def test_hf_grounding_dino_stage_end_to_end(models, tmp_path):
    stage = DetectStage(DetectConfig(backend="hf", hf_model=models["gd"], floor=0.0, max_candidates=25,
                                     input_size=96, max_size=160), CPU)
    table = image_table(tmp_path, [(160, 120), (90, 140), (100, 100)])
    prepared = stage.prepare_batch(table)
    assert prepared.rejects.num_rows == 0
    assert prepared.output["pix_h"].to_pylist() == [96, 149, 96] and prepared.output["pix_w"].to_pylist() == [128, 96, 96]
    result = stage.process_batch(prepared.output)
    assert result.output.schema == DETECT_SCHEMA and result.output["key"].to_pylist() == ["k0", "k1", "k2"]
    assert result.rejects.num_rows == 0
    for row in result.output.to_pylist():  # the 25 best, and each chunk's 5 best whatever the cap
        chunks = [c["chunk"] for c in row["candidates"]]
        assert 25 <= len(chunks) <= 25 + 3 * 5 and all(chunks.count(j) >= 5 for j in range(3))
    again = DetectStage(stage.config, CPU).process_batch(table)  # without prepare_batch: it decodes itself
    assert again.output.equals(result.output)


def test_hf_grounding_dino_text_padding_does_not_change_results(models):
    det = load_hf_detector(models["gd"], floor=0.0, max_candidates=1000, device="cpu")
    images = [ImageInput("a", rgb(96, 128, 1)), ImageInput("b", rgb(96, 128, 2))]
    prompts = [PROMPT, ChunkPrompt.from_caption(CAPTION, [(20, 27)])]  # 10 and 4 tokens: b's is padded
    together = det.detect(images, prompts)
    for i in range(2):
        check_candidates(together[i], len(prompts[i].phrases), 1000)
        same(together[i], det.detect([images[i]], [prompts[i]])[0])


def test_hf_grounding_dino_batches_one_size_so_every_image_scores_as_alone(models):
    """Zero padding reaches the backbone's border features (by 0.5 or more in score with these random
    weights), so a batch holds images of one pixel size only: every image of a mixed batch then gets the
    scores it gets alone, whatever the batch size."""
    seen = []
    sizes = [(96, 160), (112, 96), (96, 160), (128, 160), (112, 96)]
    images = [ImageInput(f"k{i}", rgb(h, w, i)) for i, (h, w) in enumerate(sizes)]
    prompts = [PROMPT, ChunkPrompt.from_caption(CAPTION, SPANS[1:])] * 2 + [PROMPT]
    alone = [load_hf_detector(models["gd"], floor=0.0, max_candidates=1000, device="cpu").detect([i], [p])[0]
             for i, p in zip(images, prompts, strict=True)]
    for batch_size in (2, 8):
        det = load_hf_detector(models["gd"], floor=0.0, max_candidates=1000, device="cpu", batch_size=batch_size)
        forward = det.model.forward

        def spy(*args, _forward=forward, **kw):
            seen.append(kw["pixel_mask"].shape[1:])
            assert bool(kw["pixel_mask"].all())  # no padding pixel in any batch
            return _forward(*args, **kw)

        det.model.forward = spy
        together = det.detect(images, prompts)
        for dets, ref in zip(together, alone, strict=True):
            check_candidates(dets, 3, 1000)
            same(dets, ref, atol=1e-6)
    assert len(seen) == 3 + 3 and set(seen) == {(96, 160), (112, 96), (128, 160)}


def test_hf_grounding_dino_prompt_splitting(models):
    """Chunks form with a 6-token budget: every chunk gets its own pass; each pass scores its chunk
    exactly as a prompt holding only that chunk does."""
    split = load_hf_detector(models["gd"], floor=0.0, max_candidates=10_000, max_text_tokens=6, device="cpu",
                             prompt="chunks")
    assert [p.text for p in split._passes(PROMPT).passes] == ["a dog .", "a field .", "flowers ."]
    image = ImageInput("k", rgb(96, 96, 3))
    dets = split.detect([image], [PROMPT])[0]
    check_candidates(dets, 3, 10_000)
    assert len(set(dets.box.tolist())) > split.num_queries  # boxes of the three passes kept apart
    whole = load_hf_detector(models["gd"], floor=0.0, max_candidates=10_000, device="cpu", prompt="chunks")
    for j, (s, e) in enumerate(SPANS):
        alone = whole.detect([image], [ChunkPrompt.from_caption(CAPTION, [(s, e)])])[0]

        assert_same_entries(dets, j, alone, 0)


def test_hf_grounding_dino_caption_prompt_and_mean_scores(models):
    """The default prompt is the caption, each chunk scored by the mean of its tokens: recomputed here
    from the model's own logits for the normalized caption."""
    det = load_hf_detector(models["gd"], floor=0.0, max_candidates=10_000, chunk_candidates=0, device="cpu")
    caption = "A Dog  in a FIELD of flowers"
    spans = [(0, 5), (10, 17), (21, 28)]  # "A Dog", "a FIELD", "flowers"
    pixels = rgb(96, 128, 7)
    dets = det.detect([ImageInput("k", pixels)], [ChunkPrompt.from_caption(caption, spans)])[0]
    enc = det._tokenize(["a dog in a field of flowers ."])
    assert det.tokenizer.convert_ids_to_tokens(enc["input_ids"][0]) == \
        ["[CLS]", "a", "dog", "in", "a", "field", "of", "flowers", ".", "[SEP]"]
    batch, valid = pad_images([pixels], det.mean, det.std, det.device)
    with torch.inference_mode():
        out = det.model(pixel_values=batch, pixel_mask=valid.long(), input_ids=enc["input_ids"],
                        attention_mask=enc["attention_mask"], token_type_ids=enc["token_type_ids"])
    probs = torch.sigmoid(out.logits[0, :, :10]).numpy()
    expect = {0: probs[:, 1:3].mean(1), 1: probs[:, 4:6].mean(1), 2: probs[:, 7:8].mean(1)}
    for j, scores in expect.items():
        np.testing.assert_allclose(np.sort(dets.score[dets.chunk == j]), np.sort(scores), atol=1e-6)


def test_hf_grounding_dino_scores_a_long_caption_in_windows(models):
    """A caption over the token budget: each chunk is scored once, in a window of the caption, exactly as
    when that window is the whole caption."""
    words = ["a big dog", "a red ball", "a small cat", "a green tree", "a blue car", "a cup"]
    caption = " and ".join(words * 2)
    spans, at = [], 0
    for w in words * 2:
        at = caption.index(w, at)
        spans.append((at, at + len(w)))
        at += len(w)
    det = load_hf_detector(models["gd"], floor=0.0, max_candidates=10_000, max_text_tokens=16, device="cpu")
    planned = det._passes(ChunkPrompt.from_caption(caption, spans))
    assert len(planned.passes) > 1 and sorted(j for p in planned.passes for j in p.chunk_ids) == list(range(12))
    image = ImageInput("k", rgb(96, 96, 4))
    dets = det.detect([image], [ChunkPrompt.from_caption(caption, spans)])[0]
    for p in planned.passes:
        window = p.text[:-2]  # without its " ."
        alone = det.detect([image], [ChunkPrompt.from_caption(window, p.char_spans)])[0]
        for k, j in enumerate(p.chunk_ids):
            assert_same_entries(dets, j, alone, k, atol=1e-6)


def test_hf_grounding_dino_matches_transformers_post_processing(models):
    from transformers import GroundingDinoImageProcessor, GroundingDinoProcessor

    det = load_hf_detector(models["gd"], floor=0.5, max_candidates=10_000, device="cpu", prompt="chunks")
    pixels = rgb(96, 128, 5)
    ours = det.detect([ImageInput("k", pixels)], [PROMPT])[0]

    enc = det._tokenize(["a dog . a field . flowers ."])
    batch, valid = pad_images([pixels], det.mean, det.std, det.device)
    with torch.inference_mode():
        outputs = det.model(pixel_values=batch, pixel_mask=valid.long(), input_ids=enc["input_ids"],
                            attention_mask=enc["attention_mask"], token_type_ids=enc["token_type_ids"])
    processor = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(), tokenizer=det.tokenizer)
    [theirs] = hf_post_process(processor, outputs, threshold=0.5, text_threshold=0.5, target_sizes=[(1, 1)],
                               input_ids=enc["input_ids"])
    first = np.unique(ours.box, return_index=True)[1]
    assert len(first) == len(theirs["scores"]) > 0
    np.testing.assert_allclose(box_table(ours.box_score[first], ours.xyxy[first]),
                               box_table(theirs["scores"].numpy(), np.clip(theirs["boxes"].numpy(), 0, 1)), atol=1e-5)


# --- a deterministic stand-in network: exact box plumbing through padding -----------------------------


class BrightBoxOracle(TokenGroundingDetector):
    """Shares the real batching, padding, token mapping and post-processing; its 'network' returns the
    bounding box of the bright pixels inside each image's mask, normalized to the unpadded image (the
    convention of GroundingDINO's outputs), with every token scoring high."""

    def __init__(self, vocab_dir, fail_above: int | None = None, **kw):
        super().__init__(device="cpu", **kw)
        from transformers import BertTokenizerFast

        self.tokenizer = BertTokenizerFast.from_pretrained(str(vocab_dir))
        self.num_queries = 1
        self.fail_above = fail_above
        self.batches = []

    def _forward(self, pixels, texts, encoding):
        self.batches.append(len(pixels))
        if self.fail_above is not None and len(pixels) > self.fail_above:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        batch, valid = pad_images(pixels, (0, 0, 0), (1, 1, 1), self.device)
        boxes = []
        for b in range(len(pixels)):
            h, w = int(valid[b].any(1).sum()), int(valid[b].any(0).sum())
            ys, xs = torch.nonzero((batch[b].mean(0) > 0.5) & valid[b], as_tuple=True)
            x1, x2, y1, y2 = xs.min() / w, (xs.max() + 1) / w, ys.min() / h, (ys.max() + 1) / h
            boxes.append([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
        logits = torch.full((len(pixels), 1, encoding["input_ids"].shape[1]), 5.0)
        return logits, torch.tensor(boxes).view(-1, 1, 4)


PLANTED = [(0.25, 0.5, 0.75, 1.0), (0.0, 0.0, 0.5, 0.25), (0.1, 0.2, 0.9, 0.6)]


def planted_image(w, h, box):
    img = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = box
    img[round(y1 * h):round(y2 * h), round(x1 * w):round(x2 * w)] = 255
    return img


def test_mixed_size_batch_gives_each_image_its_own_box(tmp_path, models):
    from stages.images import ResizeSpec, decode_image

    vocab = tiny.write_bert_vocab(tmp_path / "vocab")
    sizes = [(400, 300), (150, 260), (320, 240)]  # the first and the last both decode to 128 x 96
    spec = ResizeSpec(96, 160, "shorter")
    images = []
    for i, ((w, h), box) in enumerate(zip(sizes, PLANTED, strict=True)):
        buf = io.BytesIO()
        Image.fromarray(planted_image(w, h, box)).save(buf, "PNG")
        images.append(ImageInput(f"k{i}", decode_image(buf.getvalue(), spec).pixels))
    oracle = BrightBoxOracle(vocab, floor=0.5, batch_size=8)
    together = oracle.detect(images, [PROMPT] * 3)
    assert oracle.batches == [2, 1]  # one batch per pixel size: 128 x 96 (two images), then 92 x 159
    for img, dets, box in zip(images, together, PLANTED, strict=True):
        assert set(dets.chunk.tolist()) == {0, 1, 2}
        np.testing.assert_allclose(dets.xyxy[0], box, atol=2 / 96)
        same(dets, oracle.detect([img], [PROMPT])[0])


def test_out_of_memory_halves_the_detector_batch(tmp_path):
    vocab = tiny.write_bert_vocab(tmp_path / "vocab")
    images = [ImageInput(f"k{i}", planted_image(64, 64, PLANTED[i % 3])) for i in range(5)]
    reference = BrightBoxOracle(vocab, floor=0.5, batch_size=8).detect(images, [PROMPT] * 5)
    oracle = BrightBoxOracle(vocab, floor=0.5, batch_size=8, fail_above=1)
    results = oracle.detect(images, [PROMPT] * 5)
    assert oracle.batches == [5, 2, 1, 1, 1, 1, 1]  # 5 fail -> 2 fail -> ones
    assert oracle.batch_size == 1  # kept for the following batches
    for a, b in zip(results, reference, strict=True):
        same(a, b)


# --- transformers OWLv2 ------------------------------------------------------------------------------


def test_owlv2_stage_end_to_end(models, tmp_path):
    stage = DetectStage(DetectConfig(backend="hf", hf_model=models["owl"], floor=0.0, max_candidates=20), CPU)
    table = image_table(tmp_path, [(160, 120), (90, 140)])
    prepared = stage.prepare_batch(table)  # longer side to the model's 64 px square input
    assert prepared.output["pix_w"].to_pylist() == [64, 41] and prepared.output["pix_h"].to_pylist() == [48, 64]
    result = stage.process_batch(prepared.output)
    assert result.rejects.num_rows == 0 and result.output.num_rows == 2


def test_owlv2_one_query_per_chunk_and_query_padding(models):
    det = load_hf_detector(models["owl"], floor=0.0, max_candidates=1000, device="cpu")
    assert isinstance(det, HFOwlv2)
    images = [ImageInput("a", rgb(48, 64, 1)), ImageInput("b", rgb(64, 40, 2))]
    prompts = [PROMPT, ChunkPrompt.from_caption(CAPTION, [(9, 16)])]  # b's query list is padded
    together = det.detect(images, prompts)
    assert set(together[0].chunk.tolist()) == {0, 1, 2} and set(together[1].chunk.tolist()) == {0}
    for i in range(2):
        check_candidates(together[i], len(prompts[i].phrases), 1000)
        same(together[i], det.detect([images[i]], [prompts[i]])[0])


def test_owlv2_boxes_map_from_the_padded_square(models, monkeypatch):
    det = load_hf_detector(models["owl"], floor=0.0, max_candidates=1000, device="cpu")
    n = det.model.num_patches_height * det.model.num_patches_width
    # the 'network' says: one box centred in the square's top half, everything else tiny in a corner
    boxes = torch.tensor([[0.05, 0.05, 0.02, 0.02]]).repeat(1, n, 1)
    boxes[0, 0] = torch.tensor([0.5, 0.25, 0.5, 0.25])
    logits = torch.full((1, n, 3), -9.0)
    logits[0, 0] = torch.tensor([4.0, -1.0, 0.0])

    class Out:
        pass

    out = Out()
    out.logits, out.pred_boxes = logits, boxes
    monkeypatch.setattr(det, "model", type("M", (), {"__call__": lambda self, **kw: out})())
    # a 64 x 32 (w x h) image fills the top half of the 64 px square
    dets = det.detect([ImageInput("k", rgb(32, 64, 0))], [PROMPT])[0]
    first = dets.box == 0
    assert dets.chunk[first].tolist() == [0, 1, 2]
    np.testing.assert_allclose(dets.xyxy[first][0], [0.25, 0.25, 0.75, 0.75], atol=1e-6)
    np.testing.assert_allclose(dets.score[first], 1 / (1 + np.exp(-np.array([4.0, -1.0, 0.0]))), atol=1e-6)


# --- the official GroundingDINO package --------------------------------------------------------------

class NotWeights:
    """An arbitrary object: loading it needs the full (code-running) unpickler."""


OFFICIAL_SMALL = {"enc_layers": 1, "dec_layers": 2, "num_queries": 20}


# the official package imports slowly and runs a full Swin-T backbone: in `make test`, not `make test-fast`
@pytest.fixture(scope="module")
def official(models):
    return DetectStage(DetectConfig(backend="groundingdino", gd_text_encoder=models["bert"], gd_overrides=OFFICIAL_SMALL,
                                    floor=0.0, max_candidates=1000, input_size=96, max_size=160), CPU)


@pytest.mark.slow
def test_official_groundingdino_stage_end_to_end(official, tmp_path):
    table = image_table(tmp_path, [(160, 120), (90, 140)])
    result = official.process_batch(table)
    assert result.rejects.num_rows == 0 and result.output.schema == DETECT_SCHEMA
    for row in result.output.to_pylist():  # floor 0: every query with each of the 3 chunks
        assert 0 < len(row["candidates"]) <= 20 * 3 + 20
    det = official.detector
    assert det.num_queries == 20 and det.max_text_tokens == 256
    assert fix_text_mask_order(det.model) > 0  # the text-enhancer layers exist (wrapping twice is harmless)
    assert pickle.loads(pickle.dumps(official))._detector is None  # noqa: S301  (workers get the config, not the model)


@pytest.mark.slow
def test_official_groundingdino_masks_padding_and_text(official):
    det = official.detector
    seen = []
    forward = det.model.forward

    def spy(samples, **kw):
        seen.append(((~samples.mask).sum((1, 2)).tolist(), kw["captions"]))
        return forward(samples, **kw)

    det.model.forward = spy
    try:
        images = [ImageInput("a", rgb(96, 128, 1)), ImageInput("b", rgb(80, 96, 2)), ImageInput("c", rgb(96, 128, 3))]
        prompts = [PROMPT, ChunkPrompt.from_caption(CAPTION, [(20, 27)]), ChunkPrompt.from_caption(CAPTION, SPANS[:2])]
        together = det.detect(images, prompts)
    finally:
        det.model.forward = forward
    # one batch per pixel size; the mask marks padding (none), not pixels; every prompt is the caption
    assert sorted(masks for masks, _ in seen) == [[80 * 96], [96 * 128, 96 * 128]]
    assert all(c == "a dog in a field of flowers ." for _, captions in seen for c in captions)
    for dets, prompt in zip(together, prompts, strict=True):
        check_candidates(dets, len(prompt.phrases), 60 + 3 * 5)
    # a and c share a batch with different chunks: each matches its own run (the chunks form needs
    # fix_text_mask_order there: the package mixes prompts' attention masks across images)
    for i in (0, 2):
        alone = det.detect([images[i]], [prompts[i]])[0]
        for c in range(len(prompts[i].phrases)):
            assert_same_entries(together[i], c, alone, c)


@pytest.mark.slow
def test_official_groundingdino_token_map_matches_its_tokenizer(official):
    det = official.detector
    [p] = det._passes(PROMPT).passes
    enc = det._tokenize([p.text])
    tokens = det.tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    assert tokens == ["[CLS]", "a", "dog", "in", "a", "field", "of", "flowers", ".", "[SEP]"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_official_groundingdino_loads_checkpoints(official, models, tmp_path, fmt):
    from safetensors.torch import save_file

    state = {k: v.clone() + 0.01 for k, v in official.detector.model.state_dict().items() if v.is_floating_point()}
    path = tmp_path / f"model.{fmt}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"model": {"module." + k: v for k, v in state.items()}}, path)  # wrapped, DataParallel names
    loaded = DetectStage(official.config.model_copy(update={"gd_checkpoint": str(path)}), CPU).detector
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())


@pytest.mark.slow
def test_official_groundingdino_refuses_pickled_code(official, tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": NotWeights()}, path)  # needs a full unpickler
    with pytest.raises(ValueError, match="weights_only"):
        DetectStage(official.config.model_copy(update={"gd_checkpoint": str(path)}), CPU).setup()
