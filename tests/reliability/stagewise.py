"""Run the five stages over a corpus in this process, without Ray: each stage gets exactly what the engine
would hand it (the previous output joined with every earlier stage's columns, `stage_io.join_upstream`).

Used by the stage-level reliability tests to see which stage rejected which row and why, and as the
reference the engine's output is compared with. `write_run_dir` commits such a run in the run-directory
layout (through the engine's RunDir), so the user-facing commands (`grit inspect`, `grit stats`) can be run
on the corpus without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from grit_pipeline.engine.stage_io import join_upstream
from schemas.tables import REJECT_SCHEMA
from stages.base import StageResult
from stages.chunks import ChunksConfig, ChunksStage
from stages.compose import ComposeConfig, ComposeStage
from stages.detect import DetectConfig, DetectStage
from stages.detectors.config import DetectExecution
from stages.ingest import IngestConfig, IngestStage
from stages.registry import STAGE_ORDER
from stages.select import SelectConfig, SelectStage
from stages.sources import SourceSchemaError

# Decodes images like a pixel detector would, without loading a model (resize_spec needs no weights).
DECODE_CONFIG = DetectConfig(backend="groundingdino", input_size=32)


@dataclass
class ShardRun:
    """What each stage did with one shard: its input rows, output and rejects."""

    shard: int
    inputs: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, pa.Table] = field(default_factory=dict)
    rejects: dict[str, pa.Table] = field(default_factory=dict)
    counters: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class StagewiseRun:
    shards: dict[int, ShardRun]
    failures: dict[int, str]  # shard -> error message (the shard could not be read)

    def final(self) -> pa.Table:
        """Final rows of every shard with a `shard` column."""
        return _concat([_with_shard(r.outputs["compose"].select(["key"]), s) for s, r in self.shards.items()],
                       pa.schema([("key", pa.string()), ("shard", pa.int64())]))

    def all_rejects(self) -> pa.Table:
        parts = [_with_shard(t, s) for s, r in self.shards.items() for t in r.rejects.values()]
        return _concat(parts, REJECT_SCHEMA.append(pa.field("shard", pa.int64())))


def _with_shard(table: pa.Table, shard: int) -> pa.Table:
    return table.append_column("shard", pa.array([shard] * table.num_rows, pa.int64()))


def _concat(parts: list[pa.Table], schema: pa.Schema) -> pa.Table:
    return pa.concat_tables(parts) if parts else schema.empty_table()


def run_stagewise(input_uri: str | Path, *, replay_path: str | Path | None, decode: bool,
                  chunks: ChunksStage | None = None) -> StagewiseRun:
    """All stages over every source shard. `decode`: run detect's image decoding (`prepare_batch` of a
    pixel detector) before replaying boxes; `replay_path` None skips boxes (every row gets none)."""
    ingest = IngestStage(IngestConfig(format="img2dataset"))
    chunks = chunks or ChunksStage(ChunksConfig())
    decoder = DetectStage(DECODE_CONFIG, DetectExecution(device="cpu", gpus=0)) if decode else None
    detect = DetectStage(DetectConfig(backend="replay", replay_path=str(replay_path)))
    select, compose = SelectStage(SelectConfig()), ComposeStage(ComposeConfig())
    runs: dict[int, ShardRun] = {}
    failures: dict[int, str] = {}
    for src in ingest.discover(str(input_uri)):
        try:
            raw = ingest.read(src)
        except SourceSchemaError as e:
            failures[src.index] = str(e)
            continue
        run = runs[src.index] = ShardRun(src.index)
        tables: list[pa.Table] = []
        for name in STAGE_ORDER:
            inp = raw if name == "ingest" else join_upstream(list(STAGE_ORDER[: len(tables)]), tables)
            run.inputs[name] = inp.num_rows
            if name == "detect":
                res = _detect(decoder, detect, inp)
            else:
                res = {"ingest": ingest, "chunks": chunks, "select": select, "compose": compose}[name].process_batch(inp)
            run.outputs[name], run.rejects[name], run.counters[name] = res.output, res.rejects, res.counters
            tables.append(res.output)
    return StagewiseRun(runs, failures)


def write_run_dir(run: StagewiseRun, root: Path, config: dict) -> dict[str, str]:
    """Commit every stage output of `run` under `root` (run.yaml, stage folders with `_done` markers and
    stats); returns the stage fingerprints (made-up ones: nothing here is cached or reused)."""
    import yaml

    from grit_pipeline.engine.stats import shard_stats
    from grit_pipeline.rundir.store import RunDir, ShardFiles

    fps = {name: f"{i + 1:016x}" for i, name in enumerate(STAGE_ORDER)}
    root.mkdir(parents=True, exist_ok=True)
    (root / "run.yaml").write_text(yaml.safe_dump({**config, "fingerprints": fps}, sort_keys=False))
    rundir = RunDir(str(root))
    for shard, sr in run.shards.items():
        for name in STAGE_ORDER:
            st = shard_stats(name, shard, fps[name], sr.inputs[name], sr.outputs[name], sr.rejects[name],
                             counters=sr.counters.get(name))
            rundir.commit_shard(name, fps[name], shard, ShardFiles(sr.outputs[name], sr.rejects[name], st.to_json()))
    return fps


def _detect(decoder: DetectStage | None, detect: DetectStage, inp: pa.Table) -> StageResult:
    early = REJECT_SCHEMA.empty_table()
    if decoder is not None:
        prepared = decoder.prepare_batch(inp)
        inp, early = prepared.output, prepared.rejects
    res = detect.process_batch(inp)
    return StageResult(res.output, pa.concat_tables([early, res.rejects]))
