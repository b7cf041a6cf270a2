"""The pipeline on a two-node Ray cluster on loopback (`ray.cluster_utils.Cluster`), driven through
`--address`: same final shards as the local run.

Each node has one CPU. The actor stages hold a whole CPU for as long as they run while their loader
tasks need half of one, so a run can only finish by using both nodes. The cluster lives in a subprocess
(the test process already runs the session's local Ray) and is shut down there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent

SCRIPT = """
import json, sys
from ray.cluster_utils import Cluster
from grit_pipeline.api import run_pipeline

inp, out, *overrides = sys.argv[1:]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
try:
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    nodes = len(cluster.list_all_nodes())
    result = run_pipeline(None, input=inp, output=out, overrides=overrides, address=cluster.address)
    print(json.dumps({"nodes": nodes, "ok": result.ok, "final": result.final_shards,
                      "failures": [str(f) for f in result.failures]}))
finally:
    cluster.shutdown()
"""


def test_two_node_cluster_gives_the_local_results(pipeline_run, synthetic_input, replay_overrides, tmp_path):
    _, local_run = pipeline_run
    out = tmp_path / "cluster-run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(synthetic_input.root), str(out), *replay_overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"nodes": 2, "ok": True, "final": [0, 1, 2, 3], "failures": []}
    for local in sorted((local_run / "grit").glob("shard-*.parquet")):
        assert (out / "grit" / local.name).read_bytes() == local.read_bytes()
