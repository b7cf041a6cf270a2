"""The installed version of grit-pipeline (pyproject.toml's `version`, the one place it is set); the
final shards' metadata, the dataset card and `grit --version` read it from here."""

from __future__ import annotations


def _installed_version() -> str:
    """The version of the installed distribution (pyproject.toml's `version`, the one place it is set)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("grit-pipeline")
    except PackageNotFoundError:  # a source tree on sys.path that was never installed
        return "0+unknown"


__version__ = _installed_version()
