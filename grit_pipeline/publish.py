"""Publishing final GrIT shards (`<run>/grit/shard-NNNNN.parquet`) from committed compose outputs, in
source-shard order, with one row per key across the whole dataset.

The final dataset never holds two rows with one key. A key that appears in several shards is kept in
the lowest shard and rejected (`duplicate_key`, naming that shard) from every later one; since shards
are published strictly in shard order, the result is the same whatever order the shards finished in.
One `Publisher` (a Ray actor, so the driver holds no keys) keeps an index of the 64-bit hashes of every
published key; a hash hit is confirmed against the earlier shard's keys before a row is dropped.

Per shard the publisher writes, in this order:
  grit/shard-NNNNN.parquet            the compose output minus duplicates, with the run's metadata
  publish/shard-NNNNN.rejects.parquet the duplicate_key rejects (stage "publish")
  publish/shard-NNNNN.keys            the shard's final key hashes (sorted uint64), to rebuild the index
  publish/shard-NNNNN.json            the record, written last: what the final file was derived from

A record says which compose output (sha256) the final file came from and the `basis`: a running hash
over every lower shard published before it. On a re-run a shard whose record matches its compose output
and basis is kept as it is (its key hashes reloaded); otherwise it is published again. So a threshold
change, or a lower shard published late (it failed earlier), republishes exactly the shards it affects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from grit_pipeline.rundir import FINAL, RunDir, json_bytes, parquet_bytes, sha256, shard_name
from schemas.rows import RejectReason
from schemas.tables import REJECT_SCHEMA
from stages.retry import with_retries

log = logging.getLogger(__name__)

PUBLISH = "publish"  # folder of the publish records, and the `stage` of duplicate_key rejects
GENESIS = "0" * 64  # basis of the lowest shard


def key_hashes(keys: Iterable[str]) -> np.ndarray:
    """64-bit hashes of keys (blake2b), in the order given."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(k.encode("utf-8"), digest_size=8).digest(), "little")
                        for k in keys), dtype=np.uint64)


def next_basis(basis: str, shard: int, compose_sha: str) -> str:
    return hashlib.sha256(f"{basis}|{shard}|{compose_sha}".encode()).hexdigest()


class KeyIndex:
    """Hashes of published keys -> the shard holding each, with cheap appends and vectorized lookups."""

    def __init__(self) -> None:
        self._hashes = np.empty(0, np.uint64)  # sorted
        self._shards = np.empty(0, np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_rows = 0

    def __len__(self) -> int:
        return len(self._hashes) + self._pending_rows

    def add(self, hashes: np.ndarray, shard: int) -> None:
        self._pending.append((hashes, np.full(len(hashes), shard, np.int64)))
        self._pending_rows += len(hashes)
        if self._pending_rows > max(100_000, len(self._hashes) // 4):  # amortized merge
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        hashes = np.concatenate([self._hashes, *(h for h, _ in self._pending)])
        shards = np.concatenate([self._shards, *(s for _, s in self._pending)])
        order = np.argsort(hashes, kind="stable")
        self._hashes, self._shards = hashes[order], shards[order]
        self._pending, self._pending_rows = [], 0

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """For each hash the lowest shard holding it, or -1."""
        self._merge()
        if len(self._hashes) == 0 or len(hashes) == 0:
            return np.full(len(hashes), -1, np.int64)
        pos = np.searchsorted(self._hashes, hashes)
        pos_c = np.minimum(pos, len(self._hashes) - 1)
        found = self._hashes[pos_c] == hashes
        return np.where(found, self._shards[pos_c], -1)


@dataclass(frozen=True)
class PublishReport:
    shard: int
    rows_in: int
    rows_out: int
    duplicates: int
    reused: bool  # the final file was already right (matching record); nothing rewritten


class Publisher:
    """Publishes final shards in order; lives in one Ray actor for the whole run."""

    def __init__(self, rundir: RunDir, compose_stage: str, compose_fp: str,
                 metadata: Mapping[bytes, bytes]):
        self.rundir = rundir
        self.stage = compose_stage
        self.fp = compose_fp
        self.metadata = dict(metadata)
        self.index = KeyIndex()
        self.basis = GENESIS
        self.last = -1

    def publish(self, shard: int) -> PublishReport:
        """Publish `shard` (its compose output is committed); every lower shard was published before."""
        if shard <= self.last:
            raise ValueError(f"shards are published in order: {shard} after {self.last}")
        rd = self.rundir
        marker = with_retries(lambda: rd.markers(self.stage, self.fp, [shard])[shard],
                              what=f"read the {self.stage} marker of shard {shard}")
        compose_sha = marker["files"][f"{shard_name(shard)}.parquet"]["sha256"]
        basis = self.basis
        record = self._record(shard)
        if (record is not None and record.get("compose_sha256") == compose_sha and record.get("basis") == basis
                and record.get("compose_fingerprint") == self.fp and rd.fs.exists(rd.final_path(shard))):
            hashes = np.frombuffer(rd.read_bytes(self._path(shard, "keys")), dtype="<u8").astype(np.uint64)
            self.index.add(hashes, shard)
            report = PublishReport(shard, record["rows_in"], record["rows_out"], record["duplicates"], True)
        else:
            report = self._write(shard, compose_sha, basis)
        self.basis = next_basis(basis, shard, compose_sha)
        self.last = shard
        return report

    def _write(self, shard: int, compose_sha: str, basis: str) -> PublishReport:
        rd = self.rundir
        table = with_retries(lambda: rd.read_table(self.stage, self.fp, shard),
                             what=f"read {rd.url('stages', self.stage, self.fp, shard_name(shard) + '.parquet')}")
        keys = table["key"].to_pylist()
        hashes = key_hashes(keys)
        holders = self.index.lookup(hashes)
        duplicate = np.zeros(len(keys), dtype=bool)
        for i in np.flatnonzero(holders >= 0):  # confirm each hash hit against the holder's keys
            duplicate[i] = keys[i] in self._keys_of(int(holders[i]))
        final = table.filter(pa.array(~duplicate)) if duplicate.any() else table
        final = final.replace_schema_metadata({**(final.schema.metadata or {}), **self.metadata})
        dup_rows = np.flatnonzero(duplicate)
        rejects = pa.table({
            "key": pa.array([keys[i] for i in dup_rows], pa.string()),
            "stage": pa.array([PUBLISH] * len(dup_rows), pa.string()),
            "reason": pa.array([RejectReason.DUPLICATE_KEY.value] * len(dup_rows), pa.string()),
            "detail": pa.array([f"key also in {shard_name(int(holders[i]))}, which is kept" for i in dup_rows],
                               pa.string()),
        }, schema=REJECT_SCHEMA)
        kept_hashes = np.sort(hashes[~duplicate])
        final_bytes = parquet_bytes(final.combine_chunks())
        rd.put_atomic(rd.final_path(shard), final_bytes)
        rd.put_atomic(self._path(shard, "rejects.parquet"), parquet_bytes(rejects))
        rd.put_atomic(self._path(shard, "keys"), kept_hashes.astype("<u8").tobytes())
        record = {"shard": shard, "compose_fingerprint": self.fp, "compose_sha256": compose_sha,
                  "basis": basis, "final_sha256": sha256(final_bytes), "rows_in": table.num_rows,
                  "rows_out": final.num_rows, "duplicates": int(duplicate.sum())}
        rd.put_atomic(self._path(shard, "json"), json_bytes(record))
        self.index.add(kept_hashes, shard)
        return PublishReport(shard, table.num_rows, final.num_rows, int(duplicate.sum()), False)

    _cache: tuple[int, frozenset[str]] | None = None

    def _keys_of(self, shard: int) -> frozenset[str]:
        if self._cache is None or self._cache[0] != shard:
            keys = pq.read_table(self.rundir.final_path(shard), columns=["key"], filesystem=self.rundir.fs)
            self._cache = (shard, frozenset(keys["key"].to_pylist()))
        return self._cache[1]

    def _path(self, shard: int, suffix: str) -> str:
        return publish_path(self.rundir, shard, suffix)

    def _record(self, shard: int) -> dict[str, Any] | None:
        path = self._path(shard, "json")
        try:
            return json.loads(self.rundir.read_bytes(path))
        except FileNotFoundError:
            return None


def publish_path(rundir: RunDir, shard: int, suffix: str) -> str:
    """`publish/shard-NNNNN.<suffix>`: the record (json), duplicate-key rejects, kept key hashes."""
    return rundir.path(PUBLISH, f"{shard_name(shard)}.{suffix}")


def remove_stale(rundir: RunDir, keep: Iterable[int]) -> list[int]:
    """Delete final shards (and their publish records) of shards not in `keep`; returns what was removed.
    Also removes the manifest an older engine kept in `grit/`."""
    keep = set(keep)
    removed = [s for s in rundir.final_shards() if s not in keep]
    for s in removed:
        rundir.fs.rm(rundir.final_path(s))
    for name in rundir.list_names(PUBLISH):
        stem = name.split(".", 1)[0]
        if stem.startswith("shard-") and int(stem.split("-")[1]) not in keep:
            rundir.fs.rm(rundir.path(PUBLISH, name))
    legacy = rundir.path(FINAL, "_manifest.json")
    if rundir.fs.exists(legacy):
        rundir.fs.rm(legacy)
    return removed


def publish_records(rundir: RunDir, shards: Iterable[int]) -> dict[int, dict[str, Any]]:
    """The publish records of `shards` that exist (read concurrently)."""
    names = set(rundir.list_names(PUBLISH))
    paths = {s: publish_path(rundir, s, "json") for s in shards}
    present = {s: p for s, p in paths.items() if posixpath.basename(p) in names}
    return {s: json.loads(b) for s, b in rundir.cat_many(present).items()}
