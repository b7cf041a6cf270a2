"""The run directory (DESIGN.md "Run directory"): where every stage's per-shard outputs live and get committed.

    <run>/run.yaml                                  resolved config + fingerprints
    <run>/stages/<stage>/<fp>/shard-NNNNN.parquet   output rows (key + the columns the stage adds)
    <run>/stages/<stage>/<fp>/shard-NNNNN.rejects.parquet
    <run>/stages/<stage>/<fp>/shard-NNNNN.stats.json
    <run>/stages/<stage>/<fp>/_done/shard-NNNNN     commit marker, written last
    <run>/grit/shard-NNNNN.parquet                  final GrIT shards (copies of compose output)
    <run>/report/summary.json                       merged stats

    <run>/publish/shard-NNNNN.{rejects.parquet,keys}  duplicate-key rejects, final key hashes
    <run>/publish/_ledger/, _index/                 publish records, the publisher's key index

Everything goes through fsspec, so a local path and `s3://bucket/run` behave alike. Every file appears
whole or not at all: on a local or mounted disk it is written under `<run>/_tmp/` and renamed into place;
on an object store it is one PUT (an object becomes visible only once complete). Workers write a
stage's files for a shard (`write_shard_files`); the driver then writes the shard's `_done` marker
(`write_marker`), last: a shard counts only once its marker exists, and the marker records the size and
sha256 of each file it commits. A re-run deletes what an interrupted one left: `<run>/_tmp/` and shard
files without a marker.

One run directory is written by one `grit run` at a time.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from grit_pipeline.errors import BadInput, UserError, reading

# Fixed Parquet settings: the same table always gives the same bytes (pyarrow writes no timestamps).
ROW_GROUP_ROWS = 4096
PARQUET_OPTIONS: dict[str, Any] = dict(
    compression="zstd", compression_level=3, use_dictionary=True, write_statistics=True,
    version="2.6", data_page_size=1 << 20, row_group_size=ROW_GROUP_ROWS,
)
_SHARD_NAME = re.compile(r"^shard-(\d+)$")
_SHARD_FILE = re.compile(r"^shard-(\d+)\.")
TMP = "_tmp"
DONE = "_done"
RUN_YAML = "run.yaml"
FINAL = "grit"


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **PARQUET_OPTIONS)
    return sink.getvalue().to_pybytes()


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entry_mtime(entry: dict[str, Any]) -> float | None:
    """The modification time (epoch seconds) in an fsspec `ls(detail=True)` / `info` entry, any store."""
    for name in ("mtime", "LastModified", "last_modified", "updated", "modified", "mtime_ns", "created"):
        value = entry.get(name)
        if value is None:
            continue
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value) / (1e9 if name == "mtime_ns" else 1.0)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


class NotARun(UserError, FileNotFoundError):
    """A path that holds no run directory (no `run.yaml`)."""

    def __init__(self, uri: str):
        super().__init__(f"{uri}: not a run directory (no run.yaml); pass the --output of a `grit run`")


@dataclass(frozen=True)
class ShardFiles:
    """What one stage produced for one shard, ready to commit."""

    output: pa.Table
    rejects: pa.Table
    stats: Mapping[str, Any]


class RunDir:
    """A run directory on any fsspec filesystem. Pickles as (uri, storage_options) for Ray workers."""

    def __init__(self, uri: str, storage_options: Mapping[str, Any] | None = None):
        self.uri = str(uri)
        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(self.uri, **self.storage_options)
        self.root = root.rstrip("/") or "/"

    def __reduce__(self):
        return (RunDir, (self.uri, self.storage_options))

    @property
    def _whole_read(self) -> dict[str, Any]:
        """Keyword arguments of a whole-file read: s3fs first asks an object's size (a HEAD) to split a
        large read into concurrent ranges; the run directory's files are small, so one GET does."""
        protocol = self.fs.protocol
        return {"max_concurrency": 1} if {"s3", "s3a"} & set(protocol if isinstance(protocol, (tuple, list)) else
                                                              (protocol,)) else {}

    def __repr__(self) -> str:
        return f"RunDir({self.uri!r})"

    # --- paths ---------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def url(self, *parts: str) -> str:
        return self.fs.unstrip_protocol(self.path(*parts))

    def stage_dir(self, stage: str, fp: str) -> str:
        return self.path("stages", stage, fp)

    def shard_path(self, stage: str, fp: str, shard: int, suffix: str = "parquet") -> str:
        return posixpath.join(self.stage_dir(stage, fp), f"{shard_name(shard)}.{suffix}")

    def marker_path(self, stage: str, fp: str, shard: int) -> str:
        return posixpath.join(self.stage_dir(stage, fp), DONE, shard_name(shard))

    def final_path(self, shard: int) -> str:
        return self.path(FINAL, f"{shard_name(shard)}.parquet")

    # --- low-level atomic writes ---------------------------------------------------------------------
    @property
    def renames(self) -> bool:
        """Whether writes go through `_tmp/` + rename (local and mounted disks) rather than one PUT."""
        protocol = self.fs.protocol
        return bool({"file", "local"} & set(protocol if isinstance(protocol, (tuple, list)) else (protocol,)))

    def _tmp_name(self, path: str) -> str:
        # One `_tmp/` per run: on local disk it is on the same filesystem as every target (rename works)
        return self.path(TMP, f"{posixpath.basename(path)}.{uuid.uuid4().hex}")

    def put_atomic(self, path: str, data: bytes) -> None:
        """Write `data` to `path` so that readers see either nothing or all of it."""
        if not self.renames:  # an object store: a single PUT is atomic
            self.fs.pipe_file(path, data)
            return
        tmp = self._tmp_name(path)
        self.fs.makedirs(self.path(TMP), exist_ok=True)
        self.fs.pipe_file(tmp, data)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self.fs.mv(tmp, path)

    def put_many(self, blobs: Mapping[str, bytes]) -> None:
        """`put_atomic` of several files; concurrent requests on object stores."""
        if not blobs:
            return
        if self.renames:
            for path, data in blobs.items():
                self.put_atomic(path, data)
        else:
            self.fs.pipe(dict(blobs))

    def clean_tmp(self) -> None:
        """Remove `_tmp/` (files of writes that never got moved into place; only disks have one)."""
        if not self.renames:
            return
        tmp = self.path(TMP)
        if self.fs.exists(tmp):
            self.fs.rm(tmp, recursive=True)
        self.fs.invalidate_cache(tmp)

    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(path, **self._whole_read)

    def write_text(self, relpath: str, text: str) -> str:
        path = self.path(relpath)
        self.put_atomic(path, text.encode("utf-8"))
        return path

    def write_json(self, relpath: str, obj: Any) -> str:
        path = self.path(relpath)
        self.put_atomic(path, json_bytes(obj))
        return path

    def read_json(self, relpath: str) -> Any:
        return json.loads(self.read_bytes(self.path(relpath)))

    def exists(self, relpath: str) -> bool:
        return self.fs.exists(self.path(relpath))

    def read_run_yaml(self) -> dict[str, Any]:
        """`run.yaml` (the resolved config, fingerprints, layout): `NotARun` when the folder holds none,
        `BadInput` naming it when it is not a YAML mapping."""
        try:
            data = self.read_bytes(self.path(RUN_YAML))
        except (FileNotFoundError, NotADirectoryError):
            raise NotARun(self.uri) from None
        return self.parse_run_yaml(data)

    def parse_run_yaml(self, data: bytes) -> dict[str, Any]:
        """The bytes of this run's `run.yaml` as a mapping (`read_run_yaml`)."""
        where = posixpath.join(self.uri, RUN_YAML)  # as the user spelled the run
        with reading(where, "run.yaml", yaml.YAMLError):
            doc = yaml.safe_load(data)
        if doc is None:
            return {}
        if not isinstance(doc, dict):
            raise BadInput(f"{where}: not a run.yaml (a YAML mapping of settings); found a {type(doc).__name__}")
        return doc

    def cat_many(self, paths: Mapping[int, str], missing_ok: bool = False) -> dict[int, bytes]:
        """Read many small files at once (concurrently on object stores), keyed like `paths`; with
        `missing_ok`, files that do not exist are left out instead of raising FileNotFoundError."""
        if not paths:
            return {}
        by_path = {self.fs._strip_protocol(p): k for k, p in paths.items()}
        blobs = self.fs.cat(list(paths.values()), on_error="omit" if missing_ok else "raise", **self._whole_read)
        return {by_path[self.fs._strip_protocol(p)]: b for p, b in blobs.items()}

    def list_names(self, relpath: str) -> list[str]:
        """Names directly under a folder of the run (empty if it does not exist)."""
        return self._ls_names(self.path(relpath))

    def _ls_names(self, path: str) -> list[str]:
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in entries)

    # --- stage shards --------------------------------------------------------------------------------
    def committed(self, stage: str, fp: str) -> set[int]:
        """Shards of `stage` under fingerprint `fp` whose `_done` marker exists."""
        return set(self.committed_times(stage, fp))

    def committed_times(self, stage: str, fp: str) -> dict[int, float | None]:
        """Committed shards of `stage` under `fp` -> commit time (the store-side mtime of the shard's `_done`
        marker, epoch seconds; None where the store keeps none), from one listing of `_done/`."""
        done = posixpath.join(self.stage_dir(stage, fp), DONE)
        self.fs.invalidate_cache(done)
        try:
            entries = self.fs.ls(done, detail=True)
        except FileNotFoundError:
            return {}
        out: dict[int, float | None] = {}
        for e in entries:
            m = _SHARD_NAME.match(posixpath.basename(str(e["name"]).rstrip("/")))
            if m and e.get("type", "file") == "file":
                out[int(m.group(1))] = entry_mtime(e)
        return out

    def markers(self, stage: str, fp: str, shards: Iterable[int]) -> dict[int, dict[str, Any]]:
        """The `_done` markers of committed shards (rows, files with sizes and hashes), read concurrently."""
        shards = list(shards)
        if not shards:
            return {}
        return {s: json.loads(b) for s, b in self.cat_many(
            {s: self.marker_path(stage, fp, s) for s in shards}).items()}

    def clean_uncommitted(self, stage: str, fp: str) -> list[str]:
        """Delete every shard file of `stage` without a `_done` marker (what an interrupted run left)."""
        base = self.stage_dir(stage, fp)
        removed: list[str] = []
        if not self.fs.exists(base):
            return removed
        self.fs.invalidate_cache(base)
        done = self.committed(stage, fp)
        for name in self._ls_names(base):
            m = _SHARD_FILE.match(name)
            if m and int(m.group(1)) not in done:
                path = posixpath.join(base, name)
                self.fs.rm(path)
                removed.append(path)
        return removed

    def write_shard_files(self, stage: str, fp: str, shard: int, blobs: Mapping[str, bytes]) -> dict[str, Any]:
        """Write a shard's files (`{suffix: bytes}`, e.g. "parquet", "rejects.parquet", "stats.json"), each
        atomically; returns what the marker records of them (size and sha256 of the Parquet files)."""
        for suffix, data in blobs.items():
            self.put_atomic(self.shard_path(stage, fp, shard, suffix), data)
        return {f"{shard_name(shard)}.{suffix}": {"size": len(data), "sha256": sha256(data)}
                for suffix, data in blobs.items() if suffix.endswith("parquet")}

    def write_marker(self, stage: str, fp: str, shard: int, marker: Mapping[str, Any]) -> None:
        """Commit a shard whose files are written: its `_done` marker, the last thing written."""
        self.put_atomic(self.marker_path(stage, fp, shard), json_bytes(dict(marker)))

    def commit_shard(self, stage: str, fp: str, shard: int, files: ShardFiles) -> dict[str, Any]:
        """Write a shard's output, rejects and stats, then its `_done` marker (files and commit in one call)."""
        blobs = {
            "parquet": parquet_bytes(files.output),
            "rejects.parquet": parquet_bytes(files.rejects),
            "stats.json": json_bytes(dict(files.stats)),
        }
        marker = {
            "stage": stage,
            "fingerprint": fp,
            "shard": shard,
            "rows": files.output.num_rows,
            "rejects": files.rejects.num_rows,
            "files": self.write_shard_files(stage, fp, shard, blobs),
        }
        self.write_marker(stage, fp, shard, marker)
        return marker

    def read_table(self, stage: str, fp: str, shard: int, suffix: str = "parquet",
                   columns: list[str] | None = None) -> pa.Table:
        """A stage output of a shard. A whole file from an object store is one GET (pyarrow through fsspec
        would first ask for its size, then its footer, then its data); column subsets read ranges."""
        path = self.shard_path(stage, fp, shard, suffix)
        if columns is None and not self.renames:
            return pq.read_table(pa.BufferReader(self.read_bytes(path)))
        return pq.read_table(path, filesystem=self.fs, columns=columns)

    def read_schema(self, stage: str, fp: str, shard: int) -> pa.Schema:
        return pq.read_schema(self.shard_path(stage, fp, shard), filesystem=self.fs)

    def read_stats(self, stage: str, fp: str, shards: Iterable[int], missing_ok: bool = False) -> dict[int, dict[str, Any]]:
        shards = list(shards)
        if not shards:
            return {}
        return {s: json.loads(b) for s, b in self.cat_many(
            {s: self.shard_path(stage, fp, s, "stats.json") for s in shards}, missing_ok=missing_ok).items()}

    # --- final shards --------------------------------------------------------------------------------
    def final_shard_sizes(self) -> dict[int, int]:
        """shard -> bytes of each final shard, ascending, from one listing of `grit/` with details (no stat
        per file); empty when there is none."""
        try:
            entries = self.fs.ls(self.path(FINAL), detail=True)
        except FileNotFoundError:
            return {}
        sizes = {}
        for entry in entries:
            m = re.match(r"^shard-(\d+)\.parquet$", posixpath.basename(entry["name"].rstrip("/")))
            if m and entry.get("type") != "directory":
                sizes[int(m.group(1))] = int(entry.get("size") or 0)
        return dict(sorted(sizes.items()))

    def final_shards(self) -> list[int]:
        out = []
        for name in self._ls_names(self.path(FINAL)):
            m = re.match(r"^shard-(\d+)\.parquet$", name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)
