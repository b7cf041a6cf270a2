"""Fixtures of the reliability suite: the bad-input corpus (`corpus.py`) and what the stages make of it.

Modules in this folder import `corpus` and `stagewise` as top-level modules: pytest puts this folder on
`sys.path` (rootdir-relative "prepend" import mode, no `__init__.py`).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
from corpus import Corpus, write_corpus  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Corpus:
    return write_corpus(tmp_path_factory.mktemp("reliability-corpus"))


@pytest.fixture(scope="session")
def chunks_stage():
    """One spaCy-loaded chunks stage for every stage-level run."""
    from stages.chunks import ChunksStage

    stage = ChunksStage()
    stage.setup()
    return stage


@pytest.fixture(scope="session")
def stagewise_full(corpus, chunks_stage):
    """Every stage over the corpus in-process: images decoded, boxes replayed (mode `full`)."""
    from stagewise import run_stagewise

    return run_stagewise(corpus.root, replay_path=corpus.detections, decode=True, chunks=chunks_stage)


@pytest.fixture(scope="session")
def stagewise_replay(corpus, chunks_stage):
    """Every stage over the corpus in-process as the replay backend runs it: images checked, not decoded."""
    from stagewise import run_stagewise

    return run_stagewise(corpus.root, replay_path=corpus.detections, decode=False, chunks=chunks_stage)
