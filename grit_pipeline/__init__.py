"""grit-pipeline: build GrIT, the grounded image-text corpus of Kosmos-2, from image-caption data on Ray.

The Python API mirrors the `grit` command line (`grit_pipeline.api`):

    from grit_pipeline import run_pipeline
    result = run_pipeline("configs/demo.yaml", input="data/sample", output="runs/demo",
                          overrides=["select.min_score=0.7"])

Importing this package is cheap: the engine, Ray, spaCy and torch load only when used.
"""

from __future__ import annotations

from typing import Any

_API = ("run_pipeline", "plan")  # `stats`, `validate`: grit_pipeline.api (names of submodules here)
__all__ = ["__version__", *_API]




def __getattr__(name: str) -> Any:
    if name == "__version__":
        from grit_pipeline.version import __version__

        return __version__
    if name in _API:
        from grit_pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'grit_pipeline' has no attribute {name!r}")
