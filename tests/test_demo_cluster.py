"""The documented cluster path, `docker/local-cluster.sh`: `ray start --head` plus a second `ray start
--address` node on loopback, `grit run --address` on the demo config, `grit validate`, then both nodes
stopped (only those two: the script ends them by process id)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from grit_pipeline.commands.validate import validate_run

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.ray
def test_local_two_node_cluster_script(tmp_path):
    run_dir = tmp_path / "run"
    # The script's node logs go under TMPDIR; a short one, since Ray's socket paths live there and a
    # Unix socket path may not exceed 107 bytes.
    scratch = tempfile.mkdtemp(prefix="gc-", dir="/tmp")
    try:
        proc = subprocess.run([str(REPO / "docker" / "local-cluster.sh"), str(run_dir)], cwd=REPO,
                              env=dict(os.environ, TMPDIR=scratch), capture_output=True, text=True,
                              timeout=1500, check=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    status = out[out.index("starting worker"):]
    assert len(re.findall(r"^ 1 node_[0-9a-f]+$", status.split("Pending:")[0], re.M)) == 2  # two nodes joined
    assert "2 shard(s), 11 rows: OK" in out  # `grit validate` on the cluster's output
    assert validate_run(str(run_dir)).ok
    # Nothing of the two nodes is left running.
    work = re.search(r"logs in (\S+)", out).group(1)
    leftovers = subprocess.run(["pgrep", "-f", work], capture_output=True, text=True, check=False).stdout
    assert leftovers.strip() == ""
