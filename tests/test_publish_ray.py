"""The publisher as the engine runs it: a Ray actor with `max_restarts`. Killed mid-run, Ray restarts it
and retries its call; it resumes its key index from the run directory and still rejects a later shard's
key that an earlier shard published."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from test_publish_index import _commit, _grit_rows, _no_rejects  # noqa: F401

from grit_pipeline.engine.publish import PublishReport
from grit_pipeline.engine.ray_runtime import Remote
from grit_pipeline.rundir.store import RunDir, ShardFiles

pytestmark = pytest.mark.ray


def test_a_killed_publisher_actor_resumes_its_index_and_rejects_a_later_duplicate(ray_local, tmp_path):
    ray = ray_local
    run = RunDir(str(tmp_path / "run"))
    shas = _commit(run, {s: [f"k{s}-{i}" for i in range(5)] for s in range(3)})
    actor = Remote.get().publisher.options(num_cpus=0).remote(run, "compose", "fpA", {})
    first = ray.get(actor.publish.remote([0, 1, 2], shas, ""))
    assert [r.rows_out for r in first] == [5, 5, 5]

    ray.kill(actor, no_restart=False)  # the actor process dies; Ray starts a new one (max_restarts)
    marker = run.commit_shard("compose", "fpA", 3, ShardFiles(_grit_rows(["k0-4", "fresh"]), _no_rejects(), {}))
    sha = marker["files"]["shard-00003.parquet"]["sha256"]
    [report] = ray.get(actor.publish.remote([3], {3: sha}, "0-2"), timeout=300)
    assert isinstance(report, PublishReport)
    assert (report.rows_in, report.rows_out, report.duplicates) == (2, 1, 1)
    rejects = pq.read_table(run.path("publish", "shard-00003.rejects.parquet")).to_pylist()
    assert [(r["key"], r["detail"]) for r in rejects] == [("k0-4", "key also in shard-00000, which is kept")]
    assert pq.read_table(run.final_path(3))["key"].to_pylist() == ["fresh"]
    assert ray.get(actor.finish.remote()) == []
    ray.kill(actor)
