"""Shared test setup: offline environment, a session-wide local Ray, GPU skipping, a synthetic input.

- Environment: no hub lookups, no albumentations update check, no Ray usage stats (set before anything
  imports transformers, img2dataset or Ray).
- `ray_local`: one local Ray (2 CPUs, no dashboard) for the whole session; tests that need it are marked
  `ray`. The engine reuses an initialized Ray, so its workers (and the models they loaded) stay warm.
- Tests marked `gpu` are skipped without CUDA.
- `synthetic_input`: a 4-shard img2dataset-format folder (the last one empty after ingest) with PIL-drawn JPEGs in webdataset tars and a
  replay-detections Parquet (`grit_pipeline.assets.synthetic`), plus `replay_overrides` to run detect from it.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PYTHONHASHSEED", "0")

import pytest  # noqa: E402


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A local Ray for the session (2 CPUs, no dashboard), shut down at the end. Its workers register the
    misbehaving test filesystems (`testfs`), whose fault rules live in a session folder."""
    import ray
    import testfs

    os.environ[testfs.FLAKY_DIR_ENV] = str(tmp_path_factory.mktemp("flaky-rules"))
    testfs.register()
    here = os.path.dirname(os.path.abspath(__file__))  # workers import `testfs` from tests/
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    started = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"worker_process_setup_hook": "testfs.register", "env_vars": {"PYTHONPATH": path}})
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_input(tmp_path_factory):
    """3 img2dataset shards x 40 rows (a few bad on purpose), a 4th whose downloads all failed (so every
    later stage sees an empty shard), and their replay detections."""
    from grit_pipeline.assets.synthetic import write_img2dataset

    return write_img2dataset(tmp_path_factory.mktemp("synthetic") / "input", shards=3, rows_per_shard=40,
                             failed_shards=1)


@pytest.fixture(scope="session")
def replay_overrides(synthetic_input):
    """Overrides running detect from the synthetic input's replay file, quietly, on the test Ray."""
    from grit_pipeline.assets.synthetic import replay_overrides as overrides

    return [*overrides(synthetic_input.detections), "run.progress=false"]


# Small batches split every shard over several calls (and several shards per call), so the engine's
# streaming and per-shard reassembly are exercised even on a tiny input.
SMALL_BATCHES = ["run.resources.chunks.batch_size=7", "run.resources.detect.batch_size=5"]


@pytest.fixture(scope="session")
def small_batches() -> list[str]:
    # A fixture, not an import: `from conftest import ...` picks whichever conftest module loaded first.
    return list(SMALL_BATCHES)


@pytest.fixture(scope="session")
def pipeline_run(ray_local, synthetic_input, replay_overrides, tmp_path_factory):
    """One full run of the real stages over `synthetic_input` on the session Ray: (RunResult, run dir)."""
    from grit_pipeline.api import run_pipeline

    out = tmp_path_factory.mktemp("runs") / "baseline"
    result = run_pipeline(None, input=str(synthetic_input.root), output=str(out),
                          overrides=[*replay_overrides, *SMALL_BATCHES])
    return result, out
