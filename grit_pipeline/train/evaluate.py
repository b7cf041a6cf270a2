"""`grit eval`: phrase-grounding accuracy and location-token cross-entropy on held-out GrIT shards.

Grounding: for every tagged phrase with a box, the model is given the image, the grounded caption up to
and including that phrase's `</phrase><object>` (earlier phrases keep their true location tokens, i.e.
teacher forcing), and greedily decodes two location tokens: the first over all 1,024, the second over the
cells not above or left of the first. The predicted box (decoded as `schemas.location` does) is correct when
its IoU with a ground-truth box of the phrase exceeds 0.5. Ground truth is the row's exact `ref_exps` box
for that span when it has one, else the box its location tokens decode to.

Baselines on the same phrases: always predicting the mean training box (saved in the checkpoint) and the
mean box of the evaluated phrases themselves.

Location cross-entropy: mean next-token cross-entropy (nats, full vocabulary) of the true location tokens
in the teacher-forced grounded captions; a uniform guess over location tokens scores ln(1024) = 6.93.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from grit_pipeline.train import vocab
from grit_pipeline.train.checkpoint import load_checkpoint
from grit_pipeline.train.dataset import IGNORE_INDEX, SequenceLayout, build_sequence, iter_rows, list_shards
from grit_pipeline.train.images import ImageUnavailable, decode_image, read_image_bytes
from grit_pipeline.train.model import GroundedLM
from grit_pipeline.train.tokenizer import GroundedTokenizer
from grit_pipeline.train.trainer import pick_device
from schemas.grounded_text import parse_grounded_caption

Box = tuple[float, float, float, float]
EVAL_COLUMNS = ("key", "caption", "grounded_caption", "ref_exps", "url", "image_ref", "image_bytes")


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Phrase:
    """One evaluation item: a phrase's prefix ids (ending in `<object>`) and its true boxes."""

    row: int
    prefix: list[int]
    truth: list[Box]


@dataclass
class EvalRow:
    key: str
    pixels: torch.Tensor
    ids: list[int]
    labels: list[int]
    phrases: list[Phrase] = field(default_factory=list)


def row_phrases(tok: GroundedTokenizer, layout: SequenceLayout, row: dict, index: int) -> tuple[list[int], list[int], list[Phrase]]:
    """The teacher-forced sequence of a row's grounded caption and its phrases with boxes."""
    ids, labels = build_sequence(tok, row["grounded_caption"], layout)
    parsed = parse_grounded_caption(row["grounded_caption"])
    exact: dict[tuple[int, int], list[Box]] = {}
    for e in row.get("ref_exps") or []:
        exact.setdefault((int(e[0]), int(e[1])), []).append(tuple(e[2:6]))
    boxed_spans = [s for s in parsed.spans if s.boxes]
    object_positions = [i for i, t in enumerate(ids) if t == tok.object_start_id]
    phrases = []
    # The k-th `<object>` token belongs to the k-th span that has boxes (truncation may drop the tail).
    for span, pos in zip(boxed_spans, object_positions, strict=False):
        truth = exact.get((span.start, span.end)) or list(span.coordinates())
        phrases.append(Phrase(index, ids[: pos + 1], truth))
    return ids, labels, phrases


def _rows(shards: list[str], tok: GroundedTokenizer, layout: SequenceLayout, image_size: int,
          max_rows: int | None, missing: list[str], external_images: bool | list[str] = False) -> Iterator[EvalRow]:
    """Evaluation rows in shard order; keys of rows whose image cannot be read are appended to `missing`."""
    n = 0
    for shard in shards:
        for row in iter_rows(shard, EVAL_COLUMNS):
            if max_rows is not None and n >= max_rows:
                return
            if not row.get("grounded_caption"):
                continue
            try:
                pixels = decode_image(read_image_bytes(row, shard, external_images), image_size)
            except (ImageUnavailable, OSError, ValueError):
                missing.append(row["key"])
                continue
            ids, labels, phrases = row_phrases(tok, layout, row, n)
            yield EvalRow(row["key"], pixels, ids, labels, phrases)
            n += 1


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(seqs), max(map(len, seqs))), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
    return out


def _corner_mask(first: torch.Tensor) -> torch.Tensor:
    """[B, 1024] bool: cells whose row and column are >= those of each first-corner index."""
    cells = torch.arange(vocab.NUM_LOCATION_TOKENS, device=first.device)
    return ((cells[None] // vocab.P) >= (first[:, None] // vocab.P)) & ((cells[None] % vocab.P) >= (first[:, None] % vocab.P))


@torch.no_grad()
def _next_location(model: GroundedLM, ids: list[list[int]], pixels: torch.Tensor, device,
                   allowed: torch.Tensor | None) -> torch.Tensor:
    """Greedy location index after each sequence, restricted to location tokens (and `allowed` cells)."""
    batch = _pad(ids, 0).to(device)
    h = model.hidden(batch, pixels.to(device))
    last = torch.tensor([len(s) - 1 for s in ids], device=device)
    logits = model.logits(h[torch.arange(len(ids), device=device), last])
    loc = logits[:, vocab.LOCATION_OFFSET: vocab.LOCATION_OFFSET + vocab.NUM_LOCATION_TOKENS]
    if allowed is not None:
        loc = loc.masked_fill(~allowed, float("-inf"))
    return loc.argmax(-1)


def _accuracy(preds: list[Box], truths: list[list[Box]]) -> tuple[float, float]:
    """(fraction with IoU > 0.5 against any true box, mean best IoU)."""
    best = [max(iou(p, t) for t in ts) for p, ts in zip(preds, truths, strict=True)]
    return (sum(b > 0.5 for b in best) / len(best), sum(best) / len(best)) if best else (math.nan, math.nan)


def evaluate(ckpt: str, shards: str | list[str], *, batch_size: int = 64, max_rows: int | None = None,
             device: str = "auto", torch_threads: int | None = None) -> dict:
    """Grounding accuracy, mean IoU, location cross-entropy, and the mean-box baselines (see module doc)."""
    if torch_threads:
        torch.set_num_threads(torch_threads)
    model, tok, config, state, ckpt_dir = load_checkpoint(ckpt)
    dev = pick_device(device)
    model.to(dev).eval()
    layout = SequenceLayout(config.model.num_image_tokens, config.model.max_text_tokens)
    missing: list[str] = []
    rows = list(_rows(list_shards(shards), tok, layout, config.model.image_size, max_rows, missing,
                      config.external_images))
    phrases = [p for r in rows for p in r.phrases]
    preds: list[Box] = []
    loc_nll, loc_count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i: i + batch_size]
            ids, labels = _pad([r.ids for r in chunk], tok.pad_id).to(dev), _pad([r.labels for r in chunk], IGNORE_INDEX).to(dev)
            h = model.hidden(ids, torch.stack([r.pixels for r in chunk]).to(dev))
            targets = labels[:, 1:]
            is_loc = (targets >= vocab.LOCATION_OFFSET) & (targets < vocab.LOCATION_OFFSET + vocab.NUM_LOCATION_TOKENS)
            if is_loc.any():
                logits = model.logits(h[:, :-1][is_loc])
                loc_nll += float(F.cross_entropy(logits, targets[is_loc], reduction="sum"))
                loc_count += int(is_loc.sum())
        for i in range(0, len(phrases), batch_size):
            chunk = phrases[i: i + batch_size]
            pixels = torch.stack([rows[p.row].pixels for p in chunk])
            first = _next_location(model, [p.prefix for p in chunk], pixels, dev, None)
            second = _next_location(model, [p.prefix + [tok.location_id(int(a))] for p, a in zip(chunk, first, strict=True)],
                                    pixels, dev, _corner_mask(first))
            preds.extend(vocab.decode_box(int(a), int(b)) for a, b in zip(first.tolist(), second.tolist(), strict=True))
    truths = [p.truth for p in phrases]
    acc, miou = _accuracy(preds, truths)
    eval_mean = tuple(sum(t[0][k] for t in truths) / len(truths) for k in range(4)) if truths else None
    result = {
        "checkpoint": ckpt_dir,
        "train_step": state.step,
        "rows": len(rows),
        "rows_without_image": len(missing),
        "phrases": len(phrases),
        "grounding_accuracy": acc,
        "mean_iou": miou,
        "location_ce": loc_nll / loc_count if loc_count else math.nan,
        "location_ce_uniform": math.log(vocab.NUM_LOCATION_TOKENS),
    }
    train_mean = state.mean_box()
    if train_mean:
        result["baseline_train_mean_box"] = list(train_mean)
        result["baseline_train_mean_box_accuracy"] = _accuracy([train_mean] * len(truths), truths)[0]
    if eval_mean:
        result["baseline_eval_mean_box"] = list(eval_mean)
        result["baseline_eval_mean_box_accuracy"] = _accuracy([eval_mean] * len(truths), truths)[0]
    return result
