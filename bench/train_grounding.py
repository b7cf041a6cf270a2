"""Does the reference trainer learn grounding? The README's training recipe, timed: train the default
Kosmos-2-style model (`TrainConfig` defaults, as `grit train` uses them) on synthetic GrIT shards on CPU,
then compare its phrase-grounding accuracy on held-out synthetic shards with the mean-box baselines.

    .venv/bin/python bench/train_grounding.py --out bench/out/train_grounding.json

is the same run as the README's

    grit synth --out /tmp/synth-train --shards 8 --seed 0
    grit synth --out /tmp/synth-heldout --shards 1 --seed 1
    grit train --data /tmp/synth-train --out /tmp/model --steps 1200
    grit eval  --data /tmp/synth-heldout --ckpt /tmp/model

(`grit synth` defaults: 1,000 rows per shard, 1 to 3 shapes per scene, "a red circle to the left of a blue
square"). Prints the figures and, with --out, writes them as JSON (config, steps done, seconds, load
average, eval figures). Training stops at --steps (the length of the LR schedule) or after --minutes,
whichever comes first; on a busy CPU fewer steps may fit, and the JSON says how many ran. Overrides of the
training config go last as key=value (e.g. `model.dim=128 batch_size=64`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import harness  # first: this checkout on sys.path, the offline environment

from grit_pipeline.train.config import TrainConfig, load_config
from grit_pipeline.train.evaluate import evaluate
from grit_pipeline.train.synth import SynthConfig, write_synth
from grit_pipeline.train.trainer import train


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--workdir", default=None, help="Where shards and checkpoints go and stay (default: a temp "
                    "dir, deleted at the end). Existing shards there are reused.")
    ap.add_argument("--minutes", type=float, default=10.0, help="Wall-clock training budget.")
    ap.add_argument("--steps", type=int, default=TrainConfig().steps,
                    help="Schedule length (training stops earlier at --minutes).")
    ap.add_argument("--train-shards", type=int, default=8, help="Training shards (seed 0).")
    ap.add_argument("--rows-per-shard", type=int, default=SynthConfig().rows_per_shard)
    ap.add_argument("--heldout-rows", type=int, default=SynthConfig().rows_per_shard,
                    help="Rows of the one held-out shard (seed 1).")
    ap.add_argument("--max-objects", type=int, default=SynthConfig().max_objects,
                    help="Shapes per synthetic scene: 1 to this many.")
    ap.add_argument("overrides", nargs="*", help="TrainConfig overrides, key=value.")
    args = ap.parse_args()
    if args.workdir:
        run(args, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="grit-train-bench-") as tmp:
            run(args, Path(tmp))


def run(args: argparse.Namespace, work: Path) -> None:
    train_dir, heldout_dir, run_dir = work / "train", work / "heldout", work / "run"
    if not train_dir.exists():
        write_synth(str(train_dir), SynthConfig(shards=args.train_shards, rows_per_shard=args.rows_per_shard, seed=0,
                                                max_objects=args.max_objects))
    if not heldout_dir.exists():
        write_synth(str(heldout_dir), SynthConfig(shards=1, rows_per_shard=args.heldout_rows, seed=1,
                                                  max_objects=args.max_objects))

    config = load_config(None, [f"steps={args.steps}", f"time_limit_s={args.minutes * 60}", *args.overrides])
    started = time.monotonic()
    summary = train(str(train_dir), str(run_dir), config, resume=False, progress=True)
    train_seconds = time.monotonic() - started
    figures = evaluate(str(run_dir), str(heldout_dir), device="cpu", torch_threads=config.torch_threads)

    saved = json.loads(Path(figures["checkpoint"].removeprefix("file://"), "config.json").read_text())
    m = saved["model"]
    result = {  # flat, as bench/run_all.py tabulates it
        "grounding_accuracy": round(figures["grounding_accuracy"], 4),
        "baseline_train_mean_box_accuracy": round(figures["baseline_train_mean_box_accuracy"], 4),
        "baseline_heldout_mean_box_accuracy": round(figures["baseline_eval_mean_box_accuracy"], 4),
        "mean_iou": round(figures["mean_iou"], 4),
        "location_ce": round(figures["location_ce"], 4),
        "location_ce_uniform": round(figures["location_ce_uniform"], 4),
        "heldout_rows": figures["rows"],
        "heldout_phrases": figures["phrases"],
        "train_steps": summary["steps"],
        "schedule_steps": config.steps,
        "train_seconds": round(train_seconds, 1),
        "final_train_loss": round(summary["last_loss"], 4),
        "parameters": summary["parameters"],
        "model": f"{m['image_size']} px, patch {m['patch_size']}, dim {m['dim']}, {m['vision_layers']} vision + "
                 f"{m['layers']} decoder layers, vocab {m['vocab_size']}",
        "batch_size": config.batch_size,
        "train_rows": args.train_shards * args.rows_per_shard,
        "max_objects": args.max_objects,
        "torch_threads": config.torch_threads,
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "command": " ".join(["bench/train_grounding.py", *sys.argv[1:]]),
    }
    print(f"trained {summary['steps']} steps in {train_seconds:.0f} s ({summary['parameters']:,} parameters)")
    print(f"held-out phrases: {figures['phrases']} in {figures['rows']} rows")
    print(f"grounding accuracy (IoU > 0.5): model {result['grounding_accuracy']:.3f}   "
          f"mean training box {result['baseline_train_mean_box_accuracy']:.3f}   "
          f"mean held-out box {result['baseline_heldout_mean_box_accuracy']:.3f}")
    print(f"mean IoU {figures['mean_iou']:.3f}; location-token cross-entropy {figures['location_ce']:.3f} "
          f"(uniform {figures['location_ce_uniform']:.3f})")
    harness.write_figures(result, args.out)


if __name__ == "__main__":
    main()
