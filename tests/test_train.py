"""The training loop, checkpoints and resume, DDP, and the grounding evaluation."""

import json
import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

from grit_pipeline.train import evaluate as evaluate_mod
from grit_pipeline.train import vocab
from grit_pipeline.train.checkpoint import load_checkpoint, resolve_checkpoint
from grit_pipeline.train.dataset import SequenceLayout, iter_rows, list_shards
from grit_pipeline.train.evaluate import _corner_mask, evaluate, iou, row_phrases
from grit_pipeline.train.images import decode_image, read_image_bytes
from grit_pipeline.train.model import GroundedLM
from grit_pipeline.train.testing import ddp_worker, tiny_config, tiny_shards
from grit_pipeline.train.tokenizer import GroundedTokenizer
from grit_pipeline.train.trainer import train, warmup_cosine


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    tiny_shards(str(root / "train"), shards=4, rows=12, seed=0)
    tiny_shards(str(root / "heldout"), shards=1, rows=10, seed=1)
    return str(root / "train"), str(root / "heldout")


def _metrics(out) -> list[dict]:
    with open(f"{out}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_same_seed_same_losses_other_seed_other_losses(data, tmp_path):
    shards, _ = data
    a = train(shards, str(tmp_path / "a"), tiny_config(steps=5), progress=False)["losses"]
    b = train(shards, str(tmp_path / "b"), tiny_config(steps=5), progress=False)["losses"]
    c = train(shards, str(tmp_path / "c"), tiny_config(steps=5, seed=1), progress=False)["losses"]
    assert len(a) == 5 and a == b
    assert a != c


def test_resume_continues_the_loss_curve(data, tmp_path):
    """14 steps straight vs 7 + resume to 14, with 2 DataLoader workers: 12 batches per epoch, so the resume
    fast-forwards mid-epoch and the run crosses an epoch boundary."""
    shards, _ = data
    cfg = tiny_config(steps=14, num_workers=2, checkpoint_every=7)
    straight = train(shards, str(tmp_path / "straight"), cfg, progress=False)
    first = train(shards, str(tmp_path / "resumed"), cfg, progress=False, stop_at=7)
    second = train(shards, str(tmp_path / "resumed"), cfg, progress=False)
    assert first["losses"] == pytest.approx(straight["losses"][:7], abs=1e-6)
    assert len(second["losses"]) == 7
    assert second["losses"] == pytest.approx(straight["losses"][7:], abs=1e-6)
    assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "straight")
    assert [m["epoch"] for m in _metrics(tmp_path / "straight")][-1] == 1
    # a finished run resumed again does nothing
    assert train(shards, str(tmp_path / "resumed"), cfg, progress=False)["losses"] == []


def test_checkpoint_files_latest_and_pruning(data, tmp_path):
    shards, _ = data
    out = tmp_path / "run"
    train(shards, str(out), tiny_config(steps=6, checkpoint_every=2, keep_checkpoints=2), progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000004", "step-0000006"]
    assert (out / "latest").read_text() == "checkpoints/step-0000006"
    step = out / "checkpoints" / "step-0000006"
    assert {p.name for p in step.iterdir()} == {"model.safetensors", "optimizer.pt", "trainer_state.json",
                                                "config.json", "tokenizer.json"}
    model, tok, cfg, state, where = load_checkpoint(str(out))
    assert where.endswith("step-0000006") and state.step == 6 and cfg.model.vocab_size == tok.vocab_size
    weights = load_file(str(step / "model.safetensors"))
    for name, value in model.state_dict().items():
        assert torch.equal(weights[name], value)
    assert state.box_count > 0 and all(0 <= v <= 1 for v in state.mean_box())
    assert resolve_checkpoint(str(tmp_path / "empty")) is None
    # starting again from scratch in the same folder replaces the old run instead of mixing with it
    train(shards, str(out), tiny_config(steps=3, checkpoint_every=2), progress=False, resume=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3]


def test_training_reduces_loss(data, tmp_path):
    shards, _ = data
    losses = train(shards, str(tmp_path / "r"), tiny_config(steps=30, lr=5e-3), progress=False)["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_warmup_then_cosine():
    f = warmup_cosine(tiny_config(steps=100, warmup_steps=10, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_cpu_ranks_with_gloo_and_resume(data, tmp_path):
    shards, _ = data
    out, results = tmp_path / "ddp", tmp_path / "results"
    results.mkdir()
    torch.multiprocessing.spawn(ddp_worker, args=(2, _free_port(), shards, str(out), 4, str(results), 2), nprocs=2)
    first = [json.loads((results / f"rank-{r}.json").read_text()) for r in range(2)]
    torch.multiprocessing.spawn(ddp_worker, args=(2, _free_port(), shards, str(out), 4, str(results)), nprocs=2)
    second = [json.loads((results / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [len(s["losses"]) for s in first + second] == [2, 2, 2, 2]
    for summaries in (first, second):  # DDP keeps the replicas identical
        assert summaries[0]["param_checksum"] == pytest.approx(summaries[1]["param_checksum"], rel=1e-9)
    assert first[0]["losses"] != first[1]["losses"]  # each rank reads its own shards
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3, 4]
    _, _, _, state, where = load_checkpoint(str(out))
    assert where.endswith("step-0000004") and len(state.rank_positions) == 2


# --- evaluation -------------------------------------------------------------------------------------------


def test_iou_and_corner_mask():
    assert iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert iou((0, 0, 0.5, 1), (0.5, 0, 1, 1)) == 0.0
    assert iou((0, 0, 0.5, 0.5), (0, 0, 1, 0.5)) == pytest.approx(0.5)
    mask = _corner_mask(torch.tensor([33]))[0]  # row 1, col 1
    assert mask.sum() == 31 * 31 and not mask[32] and not mask[1] and mask[33] and mask[1023]


def test_row_phrases_use_exact_boxes_and_object_positions(data):
    _, heldout = data
    tok = GroundedTokenizer.byte_level()
    layout = SequenceLayout(4, 64)
    row = next(iter_rows(list_shards(heldout)[0], evaluate_mod.EVAL_COLUMNS))
    ids, labels, phrases = row_phrases(tok, layout, row, 0)
    assert len(phrases) == len(row["ref_exps"])
    for p, e in zip(phrases, row["ref_exps"], strict=True):
        assert p.prefix[-1] == tok.object_start_id and p.prefix[-2] == tok.phrase_end_id
        assert p.truth == [tuple(e[2:6])]
        ul, lr = vocab.encode_box(e[2:6])
        assert ids[len(p.prefix): len(p.prefix) + 2] == [tok.location_id(ul), tok.location_id(lr)]


def _fingerprint(pixels: torch.Tensor) -> float:
    return round(float(pixels.double().sum()), 3)


class _Oracle(GroundedLM):
    """Predicts the true next token of every held-out sequence: the eval must then score it perfect."""

    def __init__(self, cfg, table: dict):
        super().__init__(cfg)
        self.keys = {k: i for i, k in enumerate(table)}
        self.next = torch.tensor(list(table.values()))

    def hidden(self, input_ids, pixel_values):
        rows = [[self.keys.get((_fingerprint(px), *r[: t + 1]), 0) for t in range(len(r))]
                for r, px in zip(input_ids.tolist(), pixel_values, strict=True)]
        return torch.tensor(rows, dtype=torch.float32)[..., None]

    def logits(self, hidden):
        idx = hidden[..., 0].long()
        return torch.nn.functional.one_hot(self.next[idx], self.cfg.vocab_size).float() * 50


def test_eval_scores_an_oracle_perfectly_and_the_mean_box_baseline(data, tmp_path, monkeypatch):
    shards, heldout = data
    out = tmp_path / "run"
    train(shards, str(out), tiny_config(steps=2), progress=False)
    model, tok, cfg, state, where = load_checkpoint(str(out))
    layout = SequenceLayout(cfg.model.num_image_tokens, cfg.model.max_text_tokens)
    table, truths = {}, []
    shard = list_shards(heldout)[0]
    for i, row in enumerate(iter_rows(shard, evaluate_mod.EVAL_COLUMNS)):
        ids, _, phrases = row_phrases(tok, layout, row, i)
        fp = _fingerprint(decode_image(read_image_bytes(row, shard), cfg.model.image_size))
        table.update({(fp, *ids[: t + 1]): ids[t + 1] for t in range(len(ids) - 1)})
        truths += [p.truth for p in phrases]
    oracle = _Oracle(cfg.model, table)
    monkeypatch.setattr(evaluate_mod, "load_checkpoint", lambda path: (oracle, tok, cfg, state, where))
    result = evaluate(str(out), heldout, batch_size=7)
    assert result["rows"] == 10 and result["phrases"] == len(truths) > 10
    assert result["grounding_accuracy"] == 1.0 and result["mean_iou"] > 0.8
    assert result["location_ce"] < 1e-6
    mean = [sum(t[0][k] for t in truths) / len(truths) for k in range(4)]
    assert result["baseline_eval_mean_box"] == pytest.approx(mean)
    expected = sum(max(iou(mean, b) for b in t) > 0.5 for t in truths) / len(truths)
    assert result["baseline_eval_mean_box_accuracy"] == pytest.approx(expected)
    assert result["baseline_train_mean_box"] == pytest.approx(list(state.mean_box()))


def test_eval_of_a_real_checkpoint_reports_every_figure(data, tmp_path):
    shards, heldout = data
    train(shards, str(tmp_path / "run"), tiny_config(steps=3), progress=False)
    result = evaluate(str(tmp_path / "run"), heldout, max_rows=6)
    assert result["rows"] == 6 and result["train_step"] == 3
    assert 0.0 <= result["grounding_accuracy"] <= 1.0 and 0.0 <= result["mean_iou"] <= 1.0
    assert 0.0 < result["location_ce"] < 20
    assert 0.0 <= result["baseline_train_mean_box_accuracy"] <= 1.0
