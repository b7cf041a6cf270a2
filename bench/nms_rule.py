"""What the paper's NMS rule changes: pairs and rows that `select` and `compose` keep, before and after.

Before: select v1's defaults, `nms_scope=box` (NMS over distinct boxes; a surviving box keeps every chunk
it scored for) at `nms_iou=0.5`. After: the paper's rule, `nms_scope=pair` (class-agnostic NMS over all
(box, chunk) pairs; a box survives for its best chunk only) at the new default `nms_iou=0.7`. The column
`pair@0.5` separates the two changes (scope, threshold). Everything else is the input's config.

Two inputs, each run in this process (no Ray): ingest -> chunks -> detect once, then select -> compose
once per side on the same detect output.
- `demo`: the bundled demo sample with `configs/demo.yaml` (replayed hand-placed boxes);
- `synthetic`: `grit_pipeline.assets.synthetic.write_img2dataset(shards=4, rows_per_shard=5000)` (20,000 rows)
  with the replay detector over its detections file.

    python bench/nms_rule.py [--rows-per-shard 5000] [--out bench/out/nms_rule.json]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import harness  # first: this checkout on sys.path, the offline environment

from grit_pipeline.assets.synthetic import replay_overrides, write_img2dataset
from grit_pipeline.config import load_config
from grit_pipeline.engine.stage_io import join_upstream
from stages.compose import ComposeStage
from stages.registry import STAGE_ORDER, stage_class
from stages.select import SelectStage

SIDES = {
    "before": {"nms_scope": "box", "nms_iou": 0.5},
    "after": {"nms_scope": "pair", "nms_iou": 0.7},
    "pair@0.5": {"nms_scope": "pair", "nms_iou": 0.5},
}


def _list_total(table, column: str) -> int:
    return len(table[column].combine_chunks().flatten()) if table.num_rows else 0


def measure(config: str | None, overrides: list[str], input_uri: str) -> dict[str, dict[str, int]]:
    """Per side: select's rows and pairs kept, compose's rows and entries (`noun_chunks`)."""
    cfg = load_config(config, overrides)
    early = [stage_class(n)(getattr(cfg, n)) for n in STAGE_ORDER[:3]]
    for s in early:
        s.setup()
    upstream = []  # per shard: the ingest, chunks and detect outputs
    for src in early[0].discover(input_uri):
        tables = [early[0].process_batch(early[0].read(src)).output]
        for i, stage in enumerate(early[1:], start=1):
            inp = stage.prepare_batch(join_upstream(list(STAGE_ORDER[:i]), tables)).output
            tables.append(stage.process_batch(inp).output)
        upstream.append(tables)

    out = {}
    for side, nms in SIDES.items():
        select = SelectStage(cfg.select.model_copy(update=nms))
        compose = ComposeStage(cfg.compose)
        counts = dict.fromkeys(("select_rows_in", "select_rows", "select_pairs", "final_rows",
                                "final_entries"), 0)
        for tables in upstream:
            sel_in = join_upstream(list(STAGE_ORDER[:3]), tables)
            sel = select.process_batch(sel_in).output
            final = compose.process_batch(join_upstream(list(STAGE_ORDER[:4]), [*tables, sel])).output
            counts["select_rows_in"] += sel_in.num_rows
            counts["select_rows"] += sel.num_rows
            counts["select_pairs"] += _list_total(sel, "pairs")
            counts["final_rows"] += final.num_rows
            counts["final_entries"] += _list_total(final, "noun_chunks")
        out[side] = counts
    return out


def main() -> int:
    ap = harness.parser(__doc__)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--rows-per-shard", type=int, default=5000)
    ap.add_argument("--workdir", help="where to write the synthetic input (default: a temporary folder)")
    args = ap.parse_args()

    from grit_pipeline.demo import DEMO_CONFIG, DEMO_SHARDS, demo_overrides

    figures = {"demo": measure(str(DEMO_CONFIG), demo_overrides(), str(DEMO_SHARDS))}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        inp = write_img2dataset(Path(tmp) / "input", shards=args.shards, rows_per_shard=args.rows_per_shard)
        figures["synthetic"] = measure(None, replay_overrides(inp.detections), str(inp.root))
        figures["synthetic"]["source_rows"] = inp.rows

    flat = {}
    for name, sides in figures.items():
        print(f"{name}:")
        for side, counts in sides.items():
            if not isinstance(counts, dict):
                flat[f"{name}_{side}"] = counts
                continue
            print(f"  {side:<9} " + "  ".join(f"{k} {v:,}" for k, v in counts.items()))
            flat.update({f"{name}_{side}_{k}": v for k, v in counts.items()})
    harness.write_figures(flat, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
