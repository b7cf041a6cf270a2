"""What every bench/ script shares: this checkout on `sys.path`, an offline environment, the `--out FILE`
option and the figures written as one flat JSON object (what `bench/run_all.py` records in RESULTS.md).

A script in bench/ starts with

    import harness  # before any project import: puts the checkout on sys.path, sets the environment

and its `main` reads

    ap = harness.parser(__doc__)               # the docstring as --help, and --out FILE
    ap.add_argument("--rows", type=int, default=20_000)
    args = ap.parse_args()
    ...
    harness.print_figures(figures)             # optional: `name: value` per figure, for scripts without
                                               # a formatted summary of their own
    harness.write_figures(figures, args.out)   # JSON to --out (folders made as needed); nothing without it

Importing it:

- puts the repository root first on `sys.path`, so `grit_pipeline`, `stages` and `schemas` come from this
  checkout, not from an installed copy. `GRIT_REPO=/path/to/checkout` points it at another checkout
  instead: the way to measure an earlier version with today's script (`git worktree add ../before REV`,
  then `GRIT_REPO=../before python bench/NAME.py --out bench/out/NAME_before.json`; `run_all.py` records
  that file beside the current figures);
- sets the environment every benchmark wants unless the caller set it: no hub lookups, no albumentations
  update check, no Ray usage stats (`OFFLINE_ENV`), before anything imports transformers, img2dataset or Ray.

`bench/run_all.py` calls each script with `--out bench/out/NAME.json` and tabulates that JSON, so keep the
figures flat (`name: number or short string`); nested values are shown as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = Path(os.environ.get("GRIT_REPO") or BENCH_DIR.parent).resolve()
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
               "RAY_USAGE_STATS_ENABLED": "0"}

for _name, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_name, _value)
sys.path.insert(0, str(REPO))


def parser(doc: str | None, *, out_help: str = "also write the figures here as a flat JSON object"
           ) -> argparse.ArgumentParser:
    """An argument parser whose --help shows `doc` (the script's docstring) as written, with `--out FILE`."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, metavar="FILE", help=out_help)
    return ap


def print_figures(figures: Mapping[str, Any]) -> None:
    """`name: value` per figure, floats to 4 significant digits, integers with thousands separators."""
    width = max((len(k) for k in figures), default=0)
    for name, value in figures.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            text = str(value)
        else:
            text = f"{value:,.4g}" if isinstance(value, float) else f"{value:,}"
        print(f"{name:<{width}}  {text}")


def write_figures(figures: Mapping[str, Any], out: str | os.PathLike | None) -> Path | None:
    """Write `figures` to `out` as JSON (its folder made if needed); returns the path, or None without one."""
    if not out:
        return None
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=1) + "\n")
    return path
