"""Chunk quality of the `chunks` stage against human phrases: Flickr30k Entities (dev sentences).

Gold: the human-annotated phrases with `notvisual == false` in
`tests/data/flickr30k_entities_dev_sentences.jsonl`, or `--data PATH` (character offsets into `sentence`). Predictions: the
chunks of `ChunksStage.process_batch` (abstract/pronoun filter on) and, as the baseline, raw spaCy `doc.noun_chunks` from the same pipeline.

Two matchings, each giving precision (matched chunks / chunks), recall (matched phrases / phrases), F1:
- exact: a chunk's (start, end) equals a phrase's;
- head word: a chunk ends where a phrase ends (human phrases are base NPs whose last word is the head).

Also printed: the filter's top false removals -- raw chunks the stage removed that match a visual phrase by
head word -- grouped by lower-cased chunk text.

    python bench/chunk_quality.py [--out FILE] [--filter-remove WORD ...] [--filter-add WORD ...]
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import harness  # first: this checkout on sys.path, the offline environment
import pyarrow as pa

from stages.chunks import ChunksConfig, ChunksStage

FLICKR = harness.REPO / "tests" / "data" / "flickr30k_entities_dev_sentences.jsonl"  # --data overrides


def prf(matched_pred: int, n_pred: int, matched_gold: int, n_gold: int) -> dict[str, float]:
    p = matched_pred / n_pred if n_pred else 0.0
    r = matched_gold / n_gold if n_gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4)}


def score(pred: list[list[tuple[int, int]]], gold: list[list[tuple[int, int]]]) -> dict[str, float]:
    """Exact-span and head-word P/R/F1 of predicted spans against gold spans, sentence by sentence."""
    n_pred = sum(map(len, pred))
    n_gold = sum(map(len, gold))
    exact_p = exact_g = head_p = head_g = 0
    for p_spans, g_spans in zip(pred, gold, strict=True):
        g_set, g_ends = set(g_spans), {e for _, e in g_spans}
        p_set, p_ends = set(p_spans), {e for _, e in p_spans}
        exact_p += sum(s in g_set for s in p_spans)
        head_p += sum(e in g_ends for _, e in p_spans)
        exact_g += sum(s in p_set for s in g_spans)
        head_g += sum(e in p_ends for _, e in g_spans)
    out = {"chunks": n_pred, "phrases": n_gold}
    out.update({f"exact_{k}": v for k, v in prf(exact_p, n_pred, exact_g, n_gold).items()})
    out.update({f"head_{k}": v for k, v in prf(head_p, n_pred, head_g, n_gold).items()})
    return out


def main() -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("--filter-add", nargs="*", default=[], help="chunks.filter_add for this run")
    parser.add_argument("--filter-remove", nargs="*", default=[], help="chunks.filter_remove for this run")
    parser.add_argument("--top", type=int, default=20, help="false removals to list")
    parser.add_argument("--data", type=Path, default=FLICKR,
                        help="Flickr30k Entities sentences with phrase spans (JSON Lines; default: the copy in tests/data)")
    args = parser.parse_args()
    if not args.data.is_file():
        parser.error(f"--data {args.data}: no such file (the repository ships tests/data/flickr30k_entities_dev_sentences.jsonl)")

    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    sentences = [r["sentence"] for r in rows]
    gold = [[(p["char_start"], p["char_end"]) for p in r["phrases"] if not p["notvisual"]] for r in rows]

    stage = ChunksStage(ChunksConfig(filter_add=args.filter_add, filter_remove=args.filter_remove))
    stage.setup()
    started = time.perf_counter()
    docs = list(stage.nlp.pipe(sentences, batch_size=stage.execution.pipe_batch_size))
    raw = [[(c.start_char, c.end_char) for c in d.noun_chunks] for d in docs]
    raw_text = [{(c.start_char, c.end_char): c.text for c in d.noun_chunks} for d in docs]

    table = pa.table({"key": [f"{i:05d}" for i in range(len(rows))], "caption": sentences})
    result = stage.process_batch(table)
    ours: list[list[tuple[int, int]]] = [[] for _ in rows]
    out = result.output
    for key, chunks in zip(out.column("key").to_pylist(), out.column("chunks").to_pylist(), strict=True):
        ours[int(key)] = [(c["start"], c["end"]) for c in chunks]
    seconds = time.perf_counter() - started

    base, mine = score(raw, gold), score(ours, gold)
    false_removals: Counter[str] = Counter()
    true_removals = 0
    for r_spans, o_spans, g_spans, texts in zip(raw, ours, gold, raw_text, strict=True):
        g_ends, kept = {e for _, e in g_spans}, set(o_spans)
        for span in r_spans:
            if span not in kept:
                if span[1] in g_ends:
                    false_removals[texts[span].lower()] += 1
                else:
                    true_removals += 1

    print(f"Flickr30k Entities dev: {len(rows)} sentences, {base['phrases']} visual phrases ({seconds:.1f} s)")
    columns = ("exact_precision", "exact_recall", "exact_f1", "head_precision", "head_recall", "head_f1")
    titles = ("exact P", "exact R", "exact F1", "head P", "head R", "head F1")
    print(f"{'':22}{'chunks':>8}" + "".join(f"{t:>10}" for t in titles))
    for name, s in (("raw spaCy noun_chunks", base), ("chunks stage", mine)):
        print(f"{name:22}{s['chunks']:>8}" + "".join(f"{s[c]:>10.4f}" for c in columns))
    dp = mine["head_precision"] - base["head_precision"]
    dr = mine["head_recall"] - base["head_recall"]
    print(f"head-word precision {dp:+.4f}, recall {dr:+.4f} (target: precision >= +0.05, recall >= -0.01)")
    n_false = sum(false_removals.values())
    print(f"filter removed {true_removals + n_false} chunks: {true_removals} match no visual phrase, "
          f"{n_false} do (false removals); top false removals:")
    for text, n in sorted(false_removals.items(), key=lambda kv: (-kv[1], kv[0]))[: args.top]:
        print(f"  {n:4d}  {text}")

    figures: dict[str, object] = {f"baseline_{k}": v for k, v in base.items()}
    figures.update({f"stage_{k}": v for k, v in mine.items()})
    figures["head_precision_gain"] = round(dp, 4)
    figures["head_recall_change"] = round(dr, 4)
    figures["filter_removed_true"] = true_removals
    figures["filter_removed_false"] = n_false
    harness.write_figures(figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
