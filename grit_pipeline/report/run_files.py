"""Read-only, column- and shard-selective access to a run directory, for `grit report` and `grit inspect`.

Built on the engine's `grit_pipeline.rundir.RunDir` (DESIGN.md "Run directory"): the stage outputs read are
those of the fingerprints recorded in the run's `run.yaml`, and only committed shards (`_done` marker)
count. Everything goes through fsspec, so a run on `s3://` reads like a local one; callers name the
columns, shards and keys they need, so showing one row never downloads a whole stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cached_property

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import yaml

from grit_pipeline.rundir import RunDir
from schemas.tables import REJECT_SCHEMA, STAGE_SCHEMAS
from stages.registry import STAGE_ORDER


class RunNotFound(FileNotFoundError):
    """The given path holds no run directory (no `run.yaml`)."""


class RunFiles:
    """One run directory, read through the engine's `RunDir` at the fingerprints its run.yaml records."""

    def __init__(self, rundir: RunDir):
        self.rundir = rundir
        self.uri, self.fs, self.root = rundir.uri, rundir.fs, rundir.root
        self._shards: dict[str, list[int]] = {}
        self._stage_dirs: dict[str, str | None] = {}

    @classmethod
    def open(cls, uri: str, storage_options: dict | None = None) -> RunFiles:
        rundir = RunDir(uri, storage_options)
        if not rundir.exists("run.yaml"):
            raise RunNotFound(f"{uri}: not a run directory (no run.yaml); pass the --output of a `grit run`")
        return cls(rundir)

    # --- paths ---------------------------------------------------------------------------------------
    def url(self, *parts: str) -> str:
        """A path inside the run as a URL the user can paste (keeps the protocol)."""
        return self.rundir.url(*parts)

    # --- config --------------------------------------------------------------------------------------
    @cached_property
    def config(self) -> dict:
        """The resolved config of the run (`run.yaml`, stage sections at the top level)."""
        return yaml.safe_load(self.rundir.read_bytes(self.rundir.path("run.yaml"))) or {}

    @property
    def fingerprints(self) -> dict[str, str]:
        return dict(self.config.get("fingerprints") or {})

    def stage_config(self, stage: str) -> dict:
        return dict(self.config.get(stage) or {})

    # --- stage outputs -------------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> str | None:
        """The directory of `stage` under the fingerprint of this run's config; None if it has none."""
        if stage not in self._stage_dirs:
            fp = self.fingerprints.get(stage)
            d = self.rundir.stage_dir(stage, fp) if fp else None
            self._stage_dirs[stage] = d if d is not None and self.fs.exists(d) else None
        return self._stage_dirs[stage]

    def shards(self, stage: str) -> list[int]:
        """Committed shard numbers of `stage`, ascending (a shard counts once its `_done` marker exists)."""
        if stage not in self._shards:
            fp = self.fingerprints.get(stage)
            self._shards[stage] = sorted(self.rundir.committed(stage, fp)) if self.stage_dir(stage) else []
        return list(self._shards[stage])

    def shard_set(self, stage: str) -> frozenset[int]:
        return frozenset(self.shards(stage))

    def shard_file(self, stage: str, shard: int, suffix: str = "parquet") -> str:
        if self.stage_dir(stage) is None:
            raise FileNotFoundError(f"{self.uri}: stage {stage!r} has no output in this run")
        return self.rundir.shard_path(stage, self.fingerprints[stage], shard, suffix)

    def read(self, stage: str, shards: Sequence[int] | None = None, columns: Sequence[str] | None = None,
             keys: Iterable[str] | None = None, suffix: str = "parquet", missing_ok: bool = False) -> pa.Table:
        """Rows of `stage` from the given shards (all committed ones by default), only `columns`
        (with `missing_ok`, those the files lack are left out instead of failing).

        With `keys`, the filter is pushed into the Parquet scan: row groups whose key statistics cannot
        hold a wanted key are skipped without reading their data pages."""
        shards = self.shards(stage) if shards is None else list(shards)
        paths = [self.shard_file(stage, s, suffix) for s in shards]
        schema = REJECT_SCHEMA if suffix == "rejects.parquet" else None
        if not paths:
            empty = schema or STAGE_SCHEMAS[stage]
            return empty.empty_table().select(list(columns)) if columns else empty.empty_table()
        dataset = pads.dataset(paths, filesystem=self.fs, format="parquet", schema=schema)
        if columns is not None and missing_ok:
            columns = [c for c in columns if c in dataset.schema.names]
        flt = None
        if keys is not None:
            wanted = sorted(set(keys))
            flt = pc.field("key") == wanted[0] if len(wanted) == 1 else pc.field("key").isin(wanted)
        return dataset.to_table(columns=list(columns) if columns else None, filter=flt)

    def read_rejects(self, stage: str, shards: Sequence[int] | None = None,
                     keys: Iterable[str] | None = None) -> pa.Table:
        """Reject rows of `stage` (REJECT_SCHEMA) with a `shard` column added."""
        shards = self.shards(stage) if shards is None else list(shards)
        parts = []
        for s in shards:  # every committed shard has a rejects file, maybe empty
            t = self.read(stage, [s], keys=keys, suffix="rejects.parquet")
            parts.append(t.append_column("shard", pa.array([s] * len(t), pa.int32())))
        if not parts:
            return REJECT_SCHEMA.append(pa.field("shard", pa.int32())).empty_table()
        return pa.concat_tables(parts)

    def summary(self) -> dict:
        """The merged stats of the run's current fingerprints, exactly as `grit run` writes them; also
        (re)written to `report/summary.json`."""
        from grit_pipeline.engine import write_summary

        fps = self.fingerprints
        return write_summary(self.rundir, [s for s in STAGE_ORDER if s in fps], fps)

    def stages(self) -> list[str]:
        """Stages with output in this run, in pipeline order."""
        return [s for s in STAGE_ORDER if self.stage_dir(s) is not None]

    def write_text(self, relpath: str, text: str) -> str:
        """Write a file inside the run atomically; returns its URL."""
        self.rundir.write_text(relpath, text)
        return self.url(relpath)
