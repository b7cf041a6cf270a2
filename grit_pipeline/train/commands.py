"""The trainer's CLI commands -- `grit train`, `grit eval`, `grit synth`, `grit export` -- added to the
main `grit` Typer app by `register(app)` (called from `grit_pipeline.cli`)."""

from __future__ import annotations

import json
import logging
from typing import Optional

import fsspec
import typer
from rich.console import Console
from rich.table import Table

console = Console()


def _print(result: dict, title: str) -> None:
    table = Table(title=title, show_header=False)
    for k, v in result.items():
        if isinstance(v, float):
            v = f"{v:.4f}"
        elif isinstance(v, (list, tuple)):
            v = ", ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in v[:8])
        table.add_row(k, str(v))
    console.print(table)


def _write_json(path: Optional[str], data: dict) -> None:
    if path:
        with fsspec.open(path, "w") as f:
            json.dump(data, f, indent=1)


def train_command(
    shards: str = typer.Option(..., help="GrIT shards: a run dir, a folder of shards, a file or a glob (fsspec)."),
    out: str = typer.Option(..., help="Output folder for checkpoints and metrics.jsonl; resumes from it."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML TrainConfig."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps in total."),
    batch_size: Optional[int] = typer.Option(None, help="Samples per step per rank."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    seed: Optional[int] = typer.Option(None),
    grounding_fraction: Optional[float] = typer.Option(None, help="Rows trained on grounded captions."),
    workers: Optional[int] = typer.Option(None, help="DataLoader workers per rank."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (1 on a shared machine)."),
    time_limit: Optional[float] = typer.Option(None, help="Stop and checkpoint after this many seconds."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Start from scratch even if OUT has a checkpoint."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. model.dim=256"),
) -> None:
    """Train the tiny Kosmos-2-style grounded LM on GrIT shards. Several GPUs or processes:
    `torchrun --nproc_per_node N .venv/bin/grit train ...` (DDP; NCCL on GPUs, gloo on CPUs)."""
    from grit_pipeline.config import ConfigError
    from grit_pipeline.logs import basic_config  # escapes control characters in log lines
    from grit_pipeline.train.config import load_config
    from grit_pipeline.train.trainer import train

    basic_config(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(config, overrides, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                          grounding_fraction=grounding_fraction, num_workers=workers, device=device,
                          torch_threads=threads, time_limit_s=time_limit)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    result = train(shards, out, cfg, resume=not no_resume)
    losses = result.pop("losses")
    result["first_loss"] = losses[0] if losses else None
    _print(result, "train")


def eval_command(
    shards: str = typer.Option(..., help="Held-out GrIT shards."),
    ckpt: str = typer.Option(..., help="Training output folder (uses its latest checkpoint) or a step folder."),
    batch_size: int = typer.Option(64),
    max_rows: Optional[int] = typer.Option(None, help="Evaluate only the first N rows."),
    device: str = typer.Option("auto"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (1 on a shared machine)."),
    out: Optional[str] = typer.Option(None, "--out", help="Also write the figures as JSON here."),
) -> None:
    """Phrase-grounding accuracy (IoU > 0.5), location-token cross-entropy and mean-box baselines."""
    from grit_pipeline.train.evaluate import evaluate

    result = evaluate(ckpt, shards, batch_size=batch_size, max_rows=max_rows, device=device, torch_threads=threads)
    _write_json(out, result)
    _print(result, "eval")


def synth_command(
    out: str = typer.Option(..., help="Folder for the shards and their images (fsspec)."),
    shards: int = typer.Option(4, help="Number of shards."),
    rows: int = typer.Option(1000, help="Rows per shard."),
    seed: int = typer.Option(0, help="Scenes are a function of (seed, shard); use another seed for held-out data."),
    max_objects: int = typer.Option(3, min=1, max=3, help="Shapes per scene: 1 to this many."),
    embed_images: bool = typer.Option(False, help="Also store the PNG bytes in an `image_bytes` column."),
) -> None:
    """Write synthetic GrIT shards of coloured shapes with exact boxes."""
    from grit_pipeline.train.synth import SynthConfig, write_synth

    paths = write_synth(out, SynthConfig(shards=shards, rows_per_shard=rows, seed=seed, max_objects=max_objects,
                                         embed_images=embed_images))
    console.print(f"wrote {len(paths)} shards x {rows} rows under {out}")


def export_command(
    shards: str = typer.Option(..., help="GrIT shards to export."),
    out: str = typer.Option(..., help="Output folder."),
    fmt: str = typer.Option("imagefolder", "--format", help="imagefolder (images + metadata.jsonl) or parquet."),
    max_rows: Optional[int] = typer.Option(None),
) -> None:
    """Export (image, text) rows for Hugging Face Kosmos-2 fine-tuning."""
    from grit_pipeline.train.export import export_kosmos2

    _print(export_kosmos2(shards, out, fmt=fmt, max_rows=max_rows), "export")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("eval")(eval_command)
    app.command("synth")(synth_command)
    app.command("export")(export_command)
