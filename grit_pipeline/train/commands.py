"""The trainer's CLI commands -- `grit train`, `grit eval`, `grit synth`, `grit export` -- added to the
main `grit` Typer app by `register(app)` (called from `grit_pipeline.cli`)."""

from __future__ import annotations

import json
import logging
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from grit_pipeline.commands.options import JsonOpt
from grit_pipeline.train.choices import DEVICES, ExportFormat, check_device

console = Console()


def _device(value: str) -> str:
    try:
        return check_device(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


# Flags shared by the trainer's commands (and named as the pipeline's commands name theirs). The shards to
# read are `--data`; `--shards` (its name before, while `grit run --shards` is a shard range) still works
# for one release, with a warning.
OutOpt = Annotated[str, typer.Option("--out", "--output", "-o", help="Output folder (fsspec URL).")]
DATA_HELP = "GrIT shards: a run dir, a folder of shards, a file or a glob (fsspec). Required."
DataOpt = Annotated[str | None, typer.Option("--data", help=DATA_HELP, show_default=False)]
OldShardsOpt = Annotated[str | None, typer.Option("--shards", hidden=True, show_default=False,
                                                  help="Deprecated name of --data (removed in the next release).")]
MaxRowsOpt = Annotated[int | None, typer.Option("--max-rows", min=1, help="Only the first N rows.")]
DEVICE = typer.Option("--device", parser=_device, metavar="|".join(DEVICES),
                      help="auto: the GPU when CUDA is available, else the CPU.")
ThreadsOpt = Annotated[int, typer.Option("--threads", min=0, help="torch CPU threads; 0: torch's default (one "
                                                                  "per core). 1 suits the default model.")]


def _data(data: str | None, shards: str | None, command: str) -> str:
    """The `--data` value, accepting the deprecated `--shards` with a warning on stderr."""
    from schemas.display import display_text

    if shards is not None:
        if data is not None:
            raise typer.BadParameter("give --data only (--shards is its deprecated name)", param_hint="'--shards'")
        typer.echo(display_text(f"warning: `grit {command} --shards {shards}` is deprecated; use `--data {shards}` "
                                "(in `grit run`, --shards selects a shard range)"), err=True)
        return shards
    if data is None:
        raise typer.BadParameter("missing: give the GrIT shards to read", param_hint="'--data'")
    return data


def _print(result: dict, title: str, as_json: bool = False) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    table = Table(title=title, show_header=False)
    for k, v in result.items():
        if isinstance(v, float):
            v = f"{v:.4f}"
        elif isinstance(v, (list, tuple)):
            v = ", ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in v[:8])
        table.add_row(k, str(v))
    console.print(table)


def _write_json(path: str | None, data: dict) -> None:
    if path:
        import fsspec

        with fsspec.open(path, "w") as f:
            json.dump(data, f, indent=1)


def train_command(
    data: DataOpt = None,
    out: Annotated[str, typer.Option("--out", "--output", "-o",
                                     help="Output folder for checkpoints and metrics.jsonl; resumes from it.")] = ...,
    config: Annotated[str | None, typer.Option("--config", "-c", help="YAML TrainConfig.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Optimizer steps in total (default 1200).")
                     ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Samples per step per rank.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the model init and the data order.")] = None,
    grounding_fraction: Annotated[float | None, typer.Option(
        "--grounding-fraction", min=0.0, max=1.0,
        help="Fraction of rows trained on their grounded caption (default 1.0; the rest on the plain caption).")
    ] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=0, help="DataLoader workers per rank.")] = None,
    device: Annotated[str | None, DEVICE] = None,
    threads: Annotated[int | None, typer.Option(
        "--threads", min=0, help="torch CPU threads (default 1); 0: torch's default, one per core.")] = None,
    time_limit: Annotated[float | None, typer.Option(
        "--time-limit", min=0.0, help="Stop and checkpoint after this many seconds.")] = None,
    no_resume: Annotated[bool, typer.Option("--no-resume", help="Start from scratch even if OUT has a checkpoint.")
                         ] = False,
    as_json: JsonOpt = False,
    overrides: Annotated[list[str] | None, typer.Argument(
        help="TrainConfig overrides as key=value, e.g. model.dim=256 tokenizer=byte.", show_default=False)] = None,
    shards: OldShardsOpt = None,
) -> None:
    """Train the tiny Kosmos-2-style grounded LM on GrIT shards. Several GPUs or processes:
    `torchrun --nproc_per_node N .venv/bin/grit train ...` (DDP; NCCL on GPUs, gloo on CPUs)."""
    from grit_pipeline.logs import basic_config  # escapes control characters in log lines
    from grit_pipeline.train.config import load_config
    from grit_pipeline.train.trainer import train

    data = _data(data, shards, "train")
    basic_config(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(config, overrides, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                      grounding_fraction=grounding_fraction, num_workers=workers, device=device,
                      torch_threads=threads, time_limit_s=time_limit)
    result = train(data, out, cfg, resume=not no_resume)
    losses = result.pop("losses")
    result["first_loss"] = losses[0] if losses else None
    _print(result, "train", as_json)


def eval_command(
    data: Annotated[str | None, typer.Option(
        "--data", help="Held-out GrIT shards (as for `grit train --data`). Required.", show_default=False)] = None,
    ckpt: Annotated[str, typer.Option("--ckpt", help="Training output folder (uses its latest checkpoint) or a "
                                                     "step folder.")] = ...,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Rows per forward pass.")] = 64,
    max_rows: MaxRowsOpt = None,
    device: Annotated[str, DEVICE] = "auto",
    threads: ThreadsOpt = 1,
    out: Annotated[str | None, typer.Option("--out", "--output", "-o", help="Also write the figures as JSON here.")
                   ] = None,
    as_json: JsonOpt = False,
    shards: OldShardsOpt = None,
) -> None:
    """Phrase-grounding accuracy (IoU > 0.5), location-token cross-entropy and mean-box baselines."""
    from grit_pipeline.train.evaluate import evaluate

    data = _data(data, shards, "eval")
    result = evaluate(ckpt, data, batch_size=batch_size, max_rows=max_rows, device=device, torch_threads=threads)
    _write_json(out, result)
    _print(result, "eval", as_json)


def synth_command(
    out: Annotated[str, typer.Option("--out", "--output", "-o", help="Folder for the shards and their images (fsspec).")],
    shards: Annotated[int, typer.Option("--shards", min=1, help="Number of shards.")] = 4,
    rows: Annotated[int, typer.Option("--rows", min=1, help="Rows per shard.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Scenes are a function of (seed, shard); use another seed "
                                                     "for held-out data.")] = 0,
    max_objects: Annotated[int, typer.Option("--max-objects", min=1, max=3, help="Shapes per scene: 1 to this many.")
                           ] = 3,
    embed_images: Annotated[bool, typer.Option("--embed-images", help="Also store the PNG bytes in an `image_bytes` "
                                                                      "column.")] = False,
) -> None:
    """Write synthetic GrIT shards of coloured shapes with exact boxes."""
    from grit_pipeline.train.synth import SynthConfig, write_synth

    paths = write_synth(out, SynthConfig(shards=shards, rows_per_shard=rows, seed=seed, max_objects=max_objects,
                                         embed_images=embed_images))
    console.print(f"wrote {len(paths)} shards x {rows} rows under {out}")


def export_command(
    data: Annotated[str | None, typer.Option(
        "--data", help="GrIT shards to export (as for `grit train --data`). Required.", show_default=False)] = None,
    out: OutOpt = ...,
    fmt: Annotated[ExportFormat, typer.Option(
        "--format", help="imagefolder: images + metadata.jsonl; parquet: key, image bytes, text.")] = "imagefolder",
    max_rows: MaxRowsOpt = None,
    external_images: Annotated[list[str] | None, typer.Option(
        "--external-images", metavar="PREFIX",
        help="Also read images under this URI prefix (repeatable; `true`: any local path or object store). "
             "By default only the shards' folders and, for a run's shards, the run's input. Never http(s).")
    ] = None,
    as_json: JsonOpt = False,
    shards: OldShardsOpt = None,
) -> None:
    """Export (image, text) rows for Hugging Face Kosmos-2 fine-tuning."""
    from pydantic import ValidationError

    from grit_pipeline.errors import BadInput
    from grit_pipeline.train.export import export_kosmos2

    data = _data(data, shards, "export")
    allowed: bool | list[str] = external_images or False
    if external_images and len(external_images) == 1 and external_images[0].strip().lower() == "true":
        allowed = True
    try:
        result = export_kosmos2(data, out, fmt=fmt, max_rows=max_rows, external_images=allowed)
    except ValidationError as e:  # a prefix that is not one (http, relative): one error line, exit 2
        raise BadInput(f"--external-images: {' '.join(str(e).split())}") from None
    _print(result, "export", as_json)


def register(app: typer.Typer) -> None:
    """Add `train`, `eval`, `synth` and `export` to the `grit` CLI."""
    app.command("train")(train_command)
    app.command("eval")(eval_command)
    app.command("synth")(synth_command)
    app.command("export")(export_command)
