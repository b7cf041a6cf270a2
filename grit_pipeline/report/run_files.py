"""Read-only, column- and shard-selective access to a run directory, for `grit report` and `grit inspect`.

Built on the engine's `grit_pipeline.rundir.store.RunDir` (DESIGN.md "Run directory"): the stage outputs read are
those of the fingerprints recorded in the run's `run.yaml`, and only committed shards count; which those
are is answered in one place, `committed_shards`, and never by reading a file per shard. Everything goes
through fsspec, so a run on `s3://` reads like a local one; callers name the columns, shards and keys they
need, so showing one row never downloads a whole stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cached_property

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from grit_pipeline.engine.summary import committed_shards as engine_committed_shards
from grit_pipeline.rundir.store import NotARun, RunDir
from schemas.tables import REJECT_SCHEMA, STAGE_SCHEMAS
from stages.image_refs import ImageAllowList
from stages.ingest import allowed_images_of_run
from stages.registry import STAGE_ORDER

RunNotFound = NotARun  # the name the report's callers know


def committed_shards(rundir: RunDir, stage: str, fp: str) -> list[int]:
    """The committed shards of `stage` under fingerprint `fp`, ascending: the one place the report and
    `grit inspect` learn which shards exist. From the stage's ledger (a few objects whatever the run's
    size); a run directory from before ledgers lists its `_done/` (O(shards/1000) requests)."""
    return list(engine_committed_shards(rundir, stage, fp))


class RunFiles:
    """One run directory, read through the engine's `RunDir` at the fingerprints its run.yaml records."""

    def __init__(self, rundir: RunDir):
        self.rundir = rundir
        self.uri, self.fs, self.root = rundir.uri, rundir.fs, rundir.root
        self._shards: dict[str, tuple[int, ...]] = {}
        self._shard_sets: dict[str, frozenset[int]] = {}
        self._stage_dirs: dict[str, str | None] = {}

    @classmethod
    def open(cls, uri: str, storage_options: dict | None = None) -> RunFiles:
        rundir = RunDir(uri, storage_options)
        if not rundir.exists("run.yaml"):
            raise NotARun(uri)
        return cls(rundir)

    # --- paths ---------------------------------------------------------------------------------------
    def url(self, *parts: str) -> str:
        """A path inside the run as a URL the user can paste (keeps the protocol)."""
        return self.rundir.url(*parts)

    # --- config --------------------------------------------------------------------------------------
    @cached_property
    def config(self) -> dict:
        """The resolved config of the run (`run.yaml`, stage sections at the top level)."""
        return self.rundir.read_run_yaml()

    @property
    def fingerprints(self) -> dict[str, str]:
        return dict(self.config.get("fingerprints") or {})

    def stage_config(self, stage: str) -> dict:
        return dict(self.config.get(stage) or {})

    @cached_property
    def allowed_images(self) -> ImageAllowList:
        """Where the run's image references may point (its input and ingest.external_images, as run.yaml
        records them): the thumbnails read nothing else, and never http(s)."""
        return allowed_images_of_run(self.config)

    # --- stage outputs -------------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> str | None:
        """The directory of `stage` under the fingerprint of this run's config; None if it has none."""
        if stage not in self._stage_dirs:
            fp = self.fingerprints.get(stage)
            d = self.rundir.stage_dir(stage, fp) if fp else None
            self._stage_dirs[stage] = d if d is not None and self.fs.exists(d) else None
        return self._stage_dirs[stage]

    def shards(self, stage: str) -> list[int]:
        """Committed shard numbers of `stage`, ascending (`committed_shards`, asked once per stage)."""
        if stage not in self._shards:
            fp = self.fingerprints.get(stage)
            self._shards[stage] = tuple(committed_shards(self.rundir, stage, fp) if self.stage_dir(stage) else [])
        return list(self._shards[stage])

    def shard_set(self, stage: str) -> frozenset[int]:
        if stage not in self._shard_sets:
            self._shard_sets[stage] = frozenset(self.shards(stage))
        return self._shard_sets[stage]

    def shard_file(self, stage: str, shard: int, suffix: str = "parquet") -> str:
        if self.stage_dir(stage) is None:
            raise FileNotFoundError(f"{self.uri}: stage {stage!r} has no output in this run")
        return self.rundir.shard_path(stage, self.fingerprints[stage], shard, suffix)

    def read(self, stage: str, shards: Sequence[int], columns: Sequence[str] | None = None,
             keys: Iterable[str] | None = None, suffix: str = "parquet", missing_ok: bool = False) -> pa.Table:
        """Rows of `stage` from the given shards (named by the caller: there is no "all shards" default, as
        a whole stage of a large run does not fit in memory), only `columns` (with `missing_ok`, those the
        files lack are left out instead of failing).

        With `keys`, the filter is pushed into the Parquet scan: row groups whose key statistics cannot
        hold a wanted key are skipped without reading their data pages."""
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

    def read_rejects(self, stage: str, shards: Sequence[int], keys: Iterable[str] | None = None) -> pa.Table:
        """Reject rows of `stage` (REJECT_SCHEMA) from the given shards, with a `shard` column added."""
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
        from grit_pipeline.engine.summary import write_summary

        fps = self.fingerprints
        return write_summary(self.rundir, [s for s in STAGE_ORDER if s in fps], fps)

    def stages(self) -> list[str]:
        """Stages with output in this run, in pipeline order."""
        return [s for s in STAGE_ORDER if self.stage_dir(s) is not None]

    def write_text(self, relpath: str, text: str) -> str:
        """Write a file inside the run atomically; returns its URL."""
        self.rundir.write_text(relpath, text)
        return self.url(relpath)

    def write_json(self, relpath: str, obj) -> str:
        """Write a JSON file inside the run atomically, as the engine writes its JSON; returns its URL."""
        self.rundir.write_json(relpath, obj)
        return self.url(relpath)
