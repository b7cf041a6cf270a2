"""Input and run directory on S3: moto's S3 server on 127.0.0.1 (as s3fs's own tests use it), s3fs with an
explicit endpoint, credentials from the environment. The `grit run` CLI runs in a subprocess with that
environment (its local Ray workers inherit it) and must give the same final shards as a local run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from moto_s3 import moto_server

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent
BUCKET = "grit-test-bucket"


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A moto S3 server on 127.0.0.1 with credentials in the environment; yields the endpoint URL."""
    with moto_server(serial=False) as endpoint:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(key, value)
        yield endpoint


def test_run_reads_and_writes_s3_with_the_same_results_as_local(pipeline_run, synthetic_input, s3_endpoint):
    import s3fs

    from grit_pipeline.api import plan
    from grit_pipeline.commands.validate import validate_run

    _, local_run = pipeline_run
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir(BUCKET)
    fs.put(str(synthetic_input.root), f"{BUCKET}/input", recursive=True)
    fs.put(str(synthetic_input.detections), f"{BUCKET}/detections.parquet")
    overrides = ["detect.backend=replay", f"detect.replay_path=s3://{BUCKET}/detections.parquet"]

    cmd = [sys.executable, "-m", "grit_pipeline.cli", "run", "--input", f"s3://{BUCKET}/input",
           "--output", f"s3://{BUCKET}/run", "--num-cpus", "2", "--no-progress", *overrides]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]

    fs.invalidate_cache()
    # the compose outputs are the same bytes; the final shards the same rows (their metadata records
    # fingerprints, which hash the input's location, and the config, which names the S3 replay file)
    local_compose = next((local_run / "stages" / "compose").iterdir())
    s3_compose = fs.ls(f"{BUCKET}/run/stages/compose")[0]
    for local in sorted(local_compose.glob("shard-*.parquet")):
        assert fs.cat_file(f"{s3_compose}/{local.name}") == local.read_bytes()
    for local in sorted((local_run / "grit").glob("shard-*.parquet")):
        with fs.open(f"{BUCKET}/run/grit/{local.name}") as f:
            assert pq.read_table(f).equals(pq.read_table(local))
    assert fs.exists(f"{BUCKET}/run/stages/detect") and fs.exists(f"{BUCKET}/run/report/summary.json")
    assert not fs.exists(f"{BUCKET}/run/_tmp")
    report = validate_run(f"s3://{BUCKET}/run", options)
    assert report.ok and len(report.files) == 4

    # the committed shards on S3 are seen as cached, and an uncommitted leftover would be cleaned
    again = plan(None, input=f"s3://{BUCKET}/input", output=f"s3://{BUCKET}/run",
                 overrides=[*overrides, "select.min_score=0.7"])
    assert [s.cached for s in again.stages[:3]] == [[0, 1, 2, 3]] * 3
    assert [s.pending for s in again.stages[3:]] == [[0, 1, 2, 3]] * 2
    detect_dir = again.rundir.stage_dir("detect", again.fingerprints["detect"])
    again.rundir.put_atomic(f"{detect_dir}/shard-00007.parquet", b"half-written")
    assert again.rundir.clean_uncommitted("detect", again.fingerprints["detect"]) == [
        f"{detect_dir}/shard-00007.parquet"]


def test_ranged_image_reads_on_s3_keep_the_members_before_a_tar_cut(s3_endpoint, tmp_path):
    """Ingest's listing and detect's ranged reads against S3: members before a cut are read exactly; a
    member cut in the middle (a short 206 answer) or whose data is wholly past the end (S3 answers 416
    where a local read returns nothing) is a reject of its row, never a retried or failed read."""
    import io
    import tarfile

    import fsspec
    import s3fs

    from stages.image_reader import ImageLocation, read_images
    from stages.image_refs import ImageAllowList
    from stages.sources.base import list_tar_files

    s3fs.S3FileSystem.clear_instance_cache()  # the endpoint comes from this test's environment
    fs = fsspec.filesystem("s3")
    fs.mkdir(BUCKET)
    payloads = {f"{i:05d}.jpg": bytes([i]) * (3000 + i) for i in range(4)}
    local = tmp_path / "full.tar"
    with tarfile.open(local, "w") as tar:
        for name, data in payloads.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(local) as tar:
        third = tar.getmember("00002.jpg")
    whole = local.read_bytes()
    cuts = {"mid-member": third.offset_data + third.size // 2, "before-data": third.offset_data}
    for name, cut in cuts.items():
        fs.pipe(f"{BUCKET}/{name}.tar", whole[:cut])
    try:
        for name in cuts:
            url = f"s3://{BUCKET}/{name}.tar"
            listed = {m.name: m for m in list_tar_files(url)}
            assert sorted(listed) == ["00000.jpg", "00001.jpg", "00002.jpg"], name
            got = read_images([ImageLocation(f"tar://{m}::{url}", listed[m].offset, listed[m].size, key=m[:5])
                               for m in sorted(listed)], allowed=ImageAllowList.of([f"s3://{BUCKET}/"]))
            assert got[:2] == [payloads["00000.jpg"], payloads["00001.jpg"]], name
            assert got[2].reason.value == "image_unreadable" and "00002.jpg" in got[2].detail, name
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
