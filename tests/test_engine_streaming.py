"""The engine streams: stages overlap across shards (no stage barrier), final shards are published while
later shards are still in detect, and the final dataset holds each key once whatever order shards finish.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from grit_pipeline.assets.synthetic import replay_overrides, write_img2dataset
from grit_pipeline.commands.validate import validate_run
from grit_pipeline.config import load_config
from grit_pipeline.engine.plan import build_plan, default_stage_classes
from grit_pipeline.engine.runner import execute
from stages.detect import DetectStage

pytestmark = [pytest.mark.ray, pytest.mark.slow]


class SlowDetect(DetectStage):
    """The real detect stage, 0.5 s slower per batch (test-only, shipped to workers by value): 2.5 s per
    shard, so detect dominates even while the first select task starts its worker (torch import) and the
    second spaCy actor loads its model on a 2-core machine."""

    def process_batch(self, table):
        time.sleep(0.5)
        return super().process_batch(table)


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


@pytest.fixture
def six_shards(tmp_path_factory):
    return write_img2dataset(tmp_path_factory.mktemp("six") / "input", shards=6, rows_per_shard=20)


def test_final_shards_are_published_while_later_shards_are_still_in_detect(ray_local, six_shards, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    config = load_config(None, [*replay_overrides(six_shards.detections), "run.progress=false",
                                "run.resources.detect.batch_size=4", "run.shards_ahead=1"])
    classes = {**default_stage_classes(), "detect": SlowDetect}
    run = tmp_path / "run"
    plan = build_plan(config, input_uri=str(six_shards.root), output_uri=str(run), stage_classes=classes)
    result = execute(plan)
    assert result.ok, result.failures
    fps = plan.fingerprints

    def marker(stage: str, shard: int) -> Path:
        return run / "stages" / stage / fps[stage] / "_done" / f"shard-{shard:05d}"

    first_final = _mtime(run / "grit" / "shard-00000.parquet")
    assert first_final < _mtime(marker("detect", 5))  # published before the last shard left detect
    # no stage barrier: the GPU stage committed shard 0 before the CPU stages had seen the last shards
    assert _mtime(marker("detect", 0)) < _mtime(marker("chunks", 5))
    assert _mtime(marker("detect", 0)) < _mtime(marker("ingest", 5))
    # and final shards appear in shard order
    finals = [_mtime(run / "grit" / f"shard-{s:05d}.parquet") for s in range(6)]
    assert finals == sorted(finals)


def test_a_key_in_two_shards_is_kept_once_in_the_lowest_shard(ray_local, tmp_path):
    src = write_img2dataset(tmp_path / "input", shards=3, rows_per_shard=20, bad_rows=False)
    for suffix in (".parquet", ".tar", "_stats.json"):  # shard 0 given again as shard 7: same keys
        shutil.copy(src.root / f"00000{suffix}", src.root / f"00007{suffix}")
    run = tmp_path / "run"
    config = load_config(None, [*replay_overrides(src.detections), "run.progress=false"])
    result = execute(build_plan(config, input_uri=str(src.root), output_uri=str(run)))
    assert result.ok, result.failures
    assert result.final_shards == [0, 1, 2, 7]

    final = {s: pq.read_table(run / "grit" / f"shard-{s:05d}.parquet") for s in result.final_shards}
    keys = [k for t in final.values() for k in t["key"].to_pylist()]
    assert len(keys) == len(set(keys)) and final[0].num_rows > 0
    assert final[7].num_rows == 0  # every row of shard 7 repeats a key of shard 0
    rejects = pq.read_table(run / "publish" / "shard-00007.rejects.parquet")
    assert sorted(rejects["key"].to_pylist()) == sorted(final[0]["key"].to_pylist())
    assert set(rejects["reason"].to_pylist()) == {"duplicate_key"}
    assert set(rejects["detail"].to_pylist()) == {"key also in shard-00000, which is kept"}
    assert result.summary["stages"]["publish"]["rejects"] == {"duplicate_key": final[0].num_rows}
    assert validate_run(str(run)).ok

    # a copied final shard is exactly what validate refuses
    shutil.copy(run / "grit" / "shard-00000.parquet", run / "grit" / "shard-00009.parquet")
    report = validate_run(str(run))
    assert not report.ok and any("duplicate key" in p.message for p in report.problems)


def test_a_finished_run_is_ready_to_publish(pipeline_run):
    """Every final shard's metadata names the pipeline, its stages and the semantic config; the run writes
    a Hub dataset card next to the shards."""
    from huggingface_hub import DatasetCard

    from grit_pipeline.engine.card import read_shard_metadata

    result, run = pipeline_run
    meta = read_shard_metadata(str(run / "grit" / "shard-00000.parquet"))
    assert [s["name"] for s in meta["stages"]] == ["ingest", "chunks", "detect", "select", "compose"]
    fps = {s["name"]: s["fingerprint"] for s in meta["stages"]}
    assert fps == {o.name: o.fingerprint for o in result.stages}
    assert meta["config"]["select"]["min_score"] == 0.65 and "run" not in meta["config"]
    table = pq.read_table(run / "grit" / "shard-00000.parquet")
    assert pc.count_distinct(table["key"]).as_py() == table.num_rows
    card = DatasetCard.load(run / "grit" / "README.md")
    assert "\nlicense:\n" in (run / "grit" / "README.md").read_text()  # left for the user to fill
    data = card.data.to_dict()
    final_rows = result.summary["stages"]["publish"]["rows_out"]
    assert f"{final_rows:,} rows" in card.text and data["configs"][0]["data_files"]
    features = {f["name"] for f in data["dataset_info"]["features"]}
    assert {"key", "caption", "noun_chunks", "ref_exps", "grounded_caption"} <= features
    shard_bytes = sum(p.stat().st_size for p in (run / "grit").glob("shard-*.parquet"))
    assert data["dataset_info"]["splits"] == [{"name": "train", "num_bytes": shard_bytes, "num_examples": final_rows}]
    assert data["dataset_info"]["dataset_size"] == shard_bytes
    assert result.stage("select").fingerprint in card.text


def test_a_run_directory_of_the_stage_by_stage_engine_is_read_as_a_cache(pipeline_run, synthetic_input,
                                                                           replay_overrides, tmp_path):
    """A run directory as the previous engine left it (committed stage shards, `grit/` as copies of the
    compose outputs with a `_manifest.json`, no publish records, no `layout:` in run.yaml): the stage
    outputs are reused, the final shards are published again under the new rules, the manifest goes."""
    import yaml

    from grit_pipeline.api import run_pipeline

    _, baseline = pipeline_run
    old = tmp_path / "old"
    shutil.copytree(baseline, old)
    shutil.rmtree(old / "publish")
    compose = next((old / "stages" / "compose").iterdir())
    for final in (old / "grit").glob("shard-*.parquet"):
        shutil.copy(compose / final.name, final)  # the old engine's plain copies
    (old / "grit" / "_manifest.json").write_text('{"compose_fingerprint": "x", "shards": {}}')
    run_yaml = yaml.safe_load((old / "run.yaml").read_text())
    run_yaml.pop("layout")
    run_yaml.pop("planned_shards")
    (old / "run.yaml").write_text(yaml.safe_dump(run_yaml, sort_keys=False))

    result = run_pipeline(None, input=str(synthetic_input.root), output=str(old), overrides=replay_overrides)
    assert result.ok and all(s.computed == [] for s in result.stages)  # every stage output reused
    assert not (old / "grit" / "_manifest.json").exists()
    for final in sorted((baseline / "grit").glob("shard-*.parquet")):
        assert (old / "grit" / final.name).read_bytes() == final.read_bytes()


def test_a_run_whose_lease_is_taken_over_stops_and_leaves_the_directory_alone(ray_local, six_shards, tmp_path):
    """Another run takes the lease over mid-run (as it would after a stale heartbeat): this run aborts with
    LeaseLost and writes nothing more: no final shard of the new owner is removed, nor its temporary files."""
    import json
    import threading

    from grit_pipeline.rundir.conditional_write import Conflict, conditional_file
    from grit_pipeline.rundir.lease import LEASE_FILE, LeaseLost
    from grit_pipeline.rundir.store import RunDir

    config = load_config(None, [*replay_overrides(six_shards.detections), "run.progress=false",
                                "run.resources.detect.batch_size=4", "run.lease_stale_s=2"])
    classes = {**default_stage_classes(), "detect": SlowDetect}
    run = tmp_path / "run"
    plan = build_plan(config, input_uri=str(six_shards.root), output_uri=str(run), stage_classes=classes)
    first_ingest = run / "stages" / "ingest" / plan.fingerprints["ingest"] / "_done" / "shard-00000"
    theirs = [run / "grit" / "shard-00099.parquet", run / "_tmp" / "theirs"]

    def take_over() -> None:
        deadline = time.monotonic() + 120
        while not first_ingest.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # as a newcomer takes a stale lease over: compare-and-swap under the store's lock, so the holder's
        # heartbeat cannot write over it (a plain write could be overwritten by a heartbeat mid-replace)
        lease_file = conditional_file(RunDir(str(run)), LEASE_FILE)
        while True:
            current, _ = lease_file.read()
            try:
                lease_file.replace(json.dumps({**json.loads(current.data), "token": "another run",
                                               "host": "elsewhere"}).encode(), current.version)
                break
            except Conflict:  # a heartbeat came between the read and the swap: read again
                continue
        for path in theirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"the new owner's")

    thread = threading.Thread(target=take_over)
    thread.start()
    with pytest.raises(LeaseLost, match="taken over"):
        execute(plan)
    thread.join()
    assert all(path.read_bytes() == b"the new owner's" for path in theirs)
    assert json.loads((run / "lease.json").read_text())["token"] == "another run"  # left to its holder


def test_a_threshold_change_over_many_shards_keeps_its_shards_in_flight_within_the_window(ray_local, tmp_path,
                                                                                         monkeypatch):
    """After `select.min_score` changes, every shard has only the cheap stages left: they are admitted
    through a window sized from the task slots, not all at once, so each pass of the scheduling loop looks
    at a bounded number of shards however many the run has."""
    from grit_pipeline.engine.scheduler import Scheduler

    shards = 64
    src = write_img2dataset(tmp_path / "input", shards=shards, rows_per_shard=2, bad_rows=False)
    run = tmp_path / "run"
    overrides = [*replay_overrides(src.detections), "run.progress=false"]
    first = execute(build_plan(load_config(None, overrides), input_uri=str(src.root), output_uri=str(run)))
    assert first.ok, first.failures

    in_flight: list[tuple[int, int]] = []  # (shards admitted and not done, the window the run is allowed)
    admit = Scheduler._admit

    def recording_admit(self) -> None:
        admit(self)
        in_flight.append((len(self.active), self.fit.task_slots + self.plan.run.shards_ahead))

    monkeypatch.setattr(Scheduler, "_admit", recording_admit)
    again = execute(build_plan(load_config(None, [*overrides, "select.min_score=0.8"]), input_uri=str(src.root),
                               output_uri=str(run)))
    assert again.ok, again.failures
    assert again.stage("detect").cached == list(range(shards))
    assert again.stage("select").computed == again.stage("compose").computed == list(range(shards))
    assert again.final_shards == list(range(shards))
    peak, window = max(in_flight)
    assert peak <= window < shards, f"{peak} shards in flight at once, window {window}"


def test_a_run_of_many_shards_keeps_its_shards_in_flight_bounded(ray_local, tmp_path, monkeypatch):
    """Shards past detect (select and compose left) hold new admissions back once they fill their
    window, so the shards in flight stay bounded by the two windows however many the run has: each pass
    of the scheduling loop looks at those, so a run of 10,000 shards costs per shard what one of 1,000 does."""
    from grit_pipeline.engine.scheduler import Scheduler

    shards = 48
    src = write_img2dataset(tmp_path / "input", shards=shards, rows_per_shard=2, bad_rows=False)
    in_flight: list[tuple[int, int]] = []  # (shards admitted and not done, the two windows together)
    admit = Scheduler._admit

    def recording_admit(self) -> None:
        admit(self)
        in_flight.append((len(self.active), self.window + self.cheap_window))

    monkeypatch.setattr(Scheduler, "_admit", recording_admit)
    config = load_config(None, [*replay_overrides(src.detections), "run.progress=false"])
    result = execute(build_plan(config, input_uri=str(src.root), output_uri=str(tmp_path / "run")))
    assert result.ok, result.failures
    assert result.final_shards == list(range(shards))
    peak, bound = max(in_flight)
    assert peak <= bound < shards, f"{peak} shards in flight at once, bound {bound}"
