"""Running the real engine over the corpus and reading back what a run directory holds, for the
engine-level reliability tests.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from corpus import Corpus

from grit_pipeline.api import resolve_config
from grit_pipeline.engine.plan import build_plan, config_for, default_stage_classes
from grit_pipeline.engine.runner import RunResult, execute
from stages.registry import STAGE_ORDER


def replay_config(corpus: Corpus, **sections: Mapping[str, Any]) -> dict[str, Any]:
    """The pipeline config of the reliability runs: boxes replayed from the corpus, small batches so that
    every shard takes several calls, quiet. `sections` update the config's sections key by key."""
    config: dict[str, Any] = {
        "ingest": {"format": "img2dataset"},
        "detect": {"backend": "replay", "replay_path": str(corpus.detections)},
        "run": {"progress": False, "resources": {"chunks": {"batch_size": 4}, "detect": {"batch_size": 4}}},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


def run_engine(corpus: Corpus, output: Path, config: Mapping[str, Any], stage_classes=None,
               output_uri: str | None = None) -> RunResult:
    """`grit run` in-process (on the session's Ray). `stage_classes` swaps stage classes (fault hooks);
    `output_uri` names the run directory another way (e.g. through a misbehaving `testfs` filesystem)."""
    classes = {**default_stage_classes(), **(stage_classes or {})}
    cfg = config_for(classes, **config) if stage_classes else resolve_config(dict(config))
    plan = build_plan(cfg, input_uri=str(corpus.root), output_uri=output_uri or str(output),
                      stage_classes=classes)
    return execute(plan, progress=False)


def fingerprints(corpus: Corpus, output: Path, config: Mapping[str, Any]) -> dict[str, str]:
    return build_plan(resolve_config(dict(config)), input_uri=str(corpus.root), output_uri=str(output),
                      inspect_cache=False).fingerprints


def seed_from(source: Path, target: Path, stages: list[str]) -> None:
    """Copy committed stage outputs of another run, so that `target` starts with them cached."""
    for stage in stages:
        shutil.copytree(source / "stages" / stage, target / "stages" / stage)


def committed(run: Path, stage: str, fp: str) -> list[int]:
    done = run / "stages" / stage / fp / "_done"
    return sorted(int(p.name.split("-")[1]) for p in done.iterdir()) if done.is_dir() else []


def read_outcome_tables(run: Path, fps: Mapping[str, str]) -> tuple[pa.Table, pa.Table]:
    """(final rows, rejects of every stage), each with a `shard` column, from the committed files."""
    finals, rejects = [], []
    for path in sorted((run / "grit").glob("shard-*.parquet")):
        t = pq.read_table(path, columns=["key"])
        finals.append(t.append_column("shard", pa.array([int(path.stem.split("-")[1])] * t.num_rows, pa.int64())))
    for stage in STAGE_ORDER:
        for shard in committed(run, stage, fps[stage]):
            t = pq.read_table(run / "stages" / stage / fps[stage] / f"shard-{shard:05d}.rejects.parquet")
            rejects.append(t.append_column("shard", pa.array([shard] * t.num_rows, pa.int64())))
    return pa.concat_tables(finals), pa.concat_tables(rejects)


def read_stats(run: Path, stage: str, fp: str, shard: int) -> dict[str, Any]:
    return json.loads((run / "stages" / stage / fp / f"shard-{shard:05d}.stats.json").read_text())


def data_files(run: Path) -> dict[str, bytes]:
    """Every output and reject Parquet of every stage, and the final shards, by path in the run."""
    paths = [*run.glob("stages/*/*/shard-*.parquet"), *run.glob("grit/shard-*.parquet")]
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(paths)}


def broken_commits(run: Path) -> list[str]:
    """Committed shards whose files do not match their `_done` marker or do not read back whole."""
    problems = []
    for marker in sorted(run.glob("stages/*/*/_done/shard-*")):
        info = json.loads(marker.read_text())
        folder = marker.parent.parent
        for name, meta in info["files"].items():
            path = folder / name
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            data = path.read_bytes()
            if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
                problems.append(f"{path}: size/sha256 differ from {marker}")
                continue
            rows = pq.read_table(path).num_rows
            if name.endswith(".rejects.parquet"):
                ok = rows == info["rejects"]
            else:
                ok = rows == info["rows"]
            if not ok:
                problems.append(f"{path}: {rows} rows, marker says otherwise")
    return problems
