"""Does the reference trainer learn grounding? Train the tiny Kosmos-2-style model on synthetic GrIT shards
for a bounded wall-clock time on CPU, then compare its phrase-grounding accuracy on held-out synthetic
shards with the mean-box baselines.

    .venv/bin/python bench/train_grounding.py --minutes 10 --out bench/out/train_grounding.json

Prints the figures and, with --out, writes them as JSON (config, steps done, seconds, load average,
eval figures). Training data (16 x 1,000 rows, seed 0) and held-out data (500 rows, seed 1) are written by
`grit synth` under --workdir, with one or two shapes per scene by default ("a red circle to the left of a
blue square"). Training stops at --steps (the length of the LR schedule) or after --minutes, whichever
comes first; on a shared CPU fewer steps fit, and the JSON says how many ran. Overrides of the training
config go last as key=value (e.g. `model.dim=128 batch_size=64`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grit_pipeline.train.config import load_config  # noqa: E402
from grit_pipeline.train.evaluate import evaluate  # noqa: E402
from grit_pipeline.train.synth import SynthConfig, write_synth  # noqa: E402
from grit_pipeline.train.trainer import train  # noqa: E402

# The benchmark's model and schedule: small enough for a few hundred steps a minute on one CPU thread.
BENCH_CONFIG = {
    "model": {"image_size": 64, "patch_size": 8, "stem_channels": 16, "dim": 96, "heads": 4, "layers": 2,
              "vision_layers": 1, "mlp_ratio": 2, "max_text_tokens": 64},
    "batch_size": 32,
    "lr": 3e-3,
    "warmup_steps": 50,
    "grounding_fraction": 1.0,
    "num_workers": 1,
    "torch_threads": 1,
    "log_every": 25,
    "checkpoint_every": 500,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None, help="Where shards and checkpoints go (default: a temp dir).")
    ap.add_argument("--minutes", type=float, default=10.0, help="Wall-clock training budget.")
    ap.add_argument("--steps", type=int, default=1200, help="Schedule length (training stops earlier at --minutes).")
    ap.add_argument("--train-shards", type=int, default=16)
    ap.add_argument("--rows-per-shard", type=int, default=1000)
    ap.add_argument("--heldout-rows", type=int, default=500)
    ap.add_argument("--max-objects", type=int, default=2, help="Shapes per synthetic scene: 1 to this many.")
    ap.add_argument("--out", default=None, help="Write the figures here as JSON.")
    ap.add_argument("overrides", nargs="*", help="TrainConfig overrides, key=value.")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="grit-train-bench-"))
    train_dir, heldout_dir, run_dir = work / "train", work / "heldout", work / "run"
    if not train_dir.exists():
        write_synth(str(train_dir), SynthConfig(shards=args.train_shards, rows_per_shard=args.rows_per_shard, seed=0,
                                                max_objects=args.max_objects))
    if not heldout_dir.exists():
        write_synth(str(heldout_dir), SynthConfig(shards=1, rows_per_shard=args.heldout_rows, seed=1,
                                                  max_objects=args.max_objects))

    config = load_config(None, [f"steps={args.steps}", f"time_limit_s={args.minutes * 60}", *args.overrides],
                         defaults=BENCH_CONFIG)
    started = time.monotonic()
    summary = train(str(train_dir), str(run_dir), config, resume=False, progress=True)
    train_seconds = time.monotonic() - started
    figures = evaluate(str(run_dir), str(heldout_dir), device="cpu", torch_threads=config.torch_threads)

    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "train_steps": summary["steps"],
        "schedule_steps": config.steps,
        "train_seconds": round(train_seconds, 1),
        "parameters": summary["parameters"],
        "final_train_loss": summary["last_loss"],
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "config": json.loads(Path(figures["checkpoint"].removeprefix("file://"), "config.json").read_text()),
        "eval": figures,
    }
    print(f"trained {summary['steps']} steps in {train_seconds:.0f} s ({summary['parameters']:,} parameters)")
    print(f"held-out phrases: {figures['phrases']} in {figures['rows']} rows")
    print(f"grounding accuracy (IoU > 0.5): model {figures['grounding_accuracy']:.3f}   "
          f"mean training box {figures.get('baseline_train_mean_box_accuracy', float('nan')):.3f}   "
          f"mean held-out box {figures.get('baseline_eval_mean_box_accuracy', float('nan')):.3f}")
    print(f"mean IoU {figures['mean_iou']:.3f}; location-token cross-entropy {figures['location_ce']:.3f} "
          f"(uniform {figures['location_ce_uniform']:.3f})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
