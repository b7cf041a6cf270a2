"""Publishing final GrIT shards (`<run>/grit/shard-NNNNN.parquet`) from committed compose outputs, in
source-shard order, with one row per key across the whole dataset.

The final dataset never holds two rows with one key. A key that appears in several shards is kept in
the lowest shard and rejected (`duplicate_key`, naming that shard) from every later one; since shards
are published strictly in shard order, the result is the same whatever order the shards finished in.
One `Publisher` (a Ray actor, so the driver holds no keys) asks a `KeyIndex` (`key_index`: sorted runs on
local disk, persisted in `publish/_index/`, one filter in memory) which key hashes were published before;
a hash hit is confirmed against the holding shard's real keys before a row is dropped.

Per shard the publisher writes:
  grit/shard-NNNNN.parquet            the compose output minus duplicates, with the run's metadata
  publish/shard-NNNNN.rejects.parquet the duplicate_key rejects (stage "publish")
  publish/shard-NNNNN.keys            the shard's final key hashes (sorted uint64): `grit validate` merges
                                      them; a restarted publisher reads those of its last few shards
and one record in the publish ledger (`publish/_ledger/`, `grit_pipeline.rundir.ledger`; the publisher
is its one writer): which compose output (sha256) the final file came from and its `basis`, a running
hash over every lower shard published before it. On a re-run a shard whose latest record matches its
compose output and basis is kept as it is; otherwise it is published again. So a threshold change, or a
lower shard published late (it failed earlier), republishes exactly the shards it affects. A run's
publisher reads the ledger once (its summary and the segments that hold records of published shards:
O(S/1000) objects), never a file per shard.

Records (`PublishFold` adds them up; the latest record of a shard is what counts):
  {shard, fp, compose_sha256, basis, final_sha256, rows_in, rows_out, duplicates}   published
  {shard, fp, writing: true}       about to be rewritten (written before the final file is replaced, so
                                   an interrupted rewrite never leaves a record that matches)
  {shard, removing: true} / {shard, removed: true}   a stale final shard being / been deleted
A record that supersedes a published one carries `replaces` (its rows), so the fold's totals count each
shard once without holding a number per shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from grit_pipeline.engine.key_index import IndexStore, KeyIndex, index_folder
from grit_pipeline.rundir import ledger as ledger_mod
from grit_pipeline.rundir.ledger import Fold, LedgerWriter, read_ledger, read_segment
from grit_pipeline.rundir.store import FINAL, RunDir, json_bytes, parquet_bytes, sha256, shard_name
from grit_pipeline.shard_ranges import ShardRanges
from schemas.rows import RejectReason
from schemas.tables import REJECT_SCHEMA
from stages.retry import with_retries

log = logging.getLogger(__name__)

PUBLISH = "publish"  # folder of the publish files and ledger, and the `stage` of duplicate_key rejects
GENESIS = "0" * 64  # basis of the lowest shard
INDEX_FOLDER = index_folder(PUBLISH)
HOLDER_CACHE = 4  # holders' final key sets kept for confirming hash hits


def key_hashes(keys: Iterable[str]) -> np.ndarray:
    """64-bit hashes of keys (blake2b), in the order given."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(k.encode("utf-8"), digest_size=8).digest(), "little")
                        for k in keys), dtype=np.uint64)


def next_basis(basis: str, shard: int, compose_sha: str) -> str:
    return hashlib.sha256(f"{basis}|{shard}|{compose_sha}".encode()).hexdigest()


# --- the ledger's fold ------------------------------------------------------------------------------
class _Totals:
    """What one compose fingerprint has in `grit/` now."""

    __slots__ = ("published", "rows_in", "rows_out", "duplicates", "segments")

    def __init__(self) -> None:
        self.published = ShardRanges()
        self.rows_in = self.rows_out = self.duplicates = 0
        self.segments = ShardRanges()  # ledger segments holding records that touched these shards

    def to_json(self) -> dict[str, Any]:
        return {"published": str(self.published), "shards": len(self.published), "rows_in": self.rows_in,
                "rows_out": self.rows_out, "duplicates": self.duplicates, "segments": str(self.segments)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> _Totals:
        t = cls()
        t.published = ShardRanges.parse(data.get("published", ""))
        t.rows_in, t.rows_out = int(data.get("rows_in", 0)), int(data.get("rows_out", 0))
        t.duplicates = int(data.get("duplicates", 0))
        t.segments = ShardRanges.parse(data.get("segments", ""))
        return t


class PublishFold(Fold):
    """The publish ledger added up: per compose fingerprint the shards whose final file it made (latest
    record per shard) with their rows in, rows out and duplicate keys; and the shards being deleted.
    O(fingerprints x ranges) in size, whatever the number of shards."""

    kind: ClassVar[str] = "publish"

    def __init__(self) -> None:
        super().__init__()
        self.by_fp: dict[str, _Totals] = {}
        self.removing = ShardRanges()

    def holder(self, shard: int) -> str | None:
        """The fingerprint whose final file `shard` has, if any."""
        return next((fp for fp, t in self.by_fp.items() if shard in t.published), None)

    def add(self, record: Mapping[str, Any]) -> None:
        super().add(record)
        segment = (self.records - 1) // ledger_mod.SEGMENT_RECORDS
        shard = int(record["shard"])
        if record.get("removed"):
            self.removing.discard(shard)
            return
        old = self.holder(shard)
        if old is not None:
            t = self.by_fp[old]
            replaced = record.get("replaces") or {}
            t.rows_in -= int(replaced.get("rows_in", 0))
            t.rows_out -= int(replaced.get("rows_out", 0))
            t.duplicates -= int(replaced.get("duplicates", 0))
            t.published.discard(shard)
            t.segments.add(segment)
            if not t.published:
                del self.by_fp[old]
        if record.get("removing"):
            self.removing.add(shard)
            return
        t = self.by_fp.setdefault(str(record["fp"]), _Totals())
        t.published.add(shard)
        t.segments.add(segment)
        if "rows_out" in record:
            t.rows_in += int(record["rows_in"])
            t.rows_out += int(record["rows_out"])
            t.duplicates += int(record["duplicates"])

    def published(self) -> ShardRanges:
        """Every shard with a final file (any fingerprint)."""
        out = ShardRanges()
        for t in self.by_fp.values():
            out.update(t.published)
        return out

    def view(self, fingerprint: str) -> PublishedView:
        t = self.by_fp.get(fingerprint) or _Totals()
        return PublishedView(fingerprint, t.published.copy(), t.rows_in, t.rows_out, t.duplicates)

    def to_json(self) -> dict[str, Any]:
        return {"records": self.records, "removing": str(self.removing),
                "by_fp": {fp: t.to_json() for fp, t in sorted(self.by_fp.items())}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PublishFold:
        fold = cls()
        fold.records = int(data.get("records", 0))
        fold.removing = ShardRanges.parse(data.get("removing", ""))
        fold.by_fp = {str(fp): _Totals.from_json(t) for fp, t in (data.get("by_fp") or {}).items()}
        return fold


@dataclass(frozen=True)
class PublishedView:
    """What the final shards of one compose fingerprint hold (`read_published`)."""

    fingerprint: str
    shards: ShardRanges
    rows_in: int
    rows_out: int
    duplicates: int

    def stats(self) -> dict[str, Any]:
        """The `publish` entry of the run summary (`grit_pipeline.engine.stats.merge`'s per-stage form)."""
        return {"fingerprint": self.fingerprint, "shards": len(self.shards), "rows_in": self.rows_in,
                "rows_out": self.rows_out,
                "rejects": {RejectReason.DUPLICATE_KEY.value: self.duplicates} if self.duplicates else {},
                "counters": {}, "seconds": 0.0, "peak_rss_mb": 0.0}


def read_published(rundir: RunDir, compose_fp: str) -> tuple[PublishedView, bool]:
    """(what the final shards of `compose_fp` hold, whether a publish ledger exists), from the ledger's
    summary and its open segment: O(1) objects. For a refreshing reader keep a
    `LedgerReader(rundir, PUBLISH, PublishFold)` and call `.read().view(fp)`."""
    fold, found = read_ledger(rundir, PUBLISH, PublishFold)
    assert isinstance(fold, PublishFold)
    return fold.view(compose_fp), found


# --- the publisher ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PublishReport:
    shard: int
    rows_in: int
    rows_out: int
    duplicates: int
    reused: bool  # the final file was already right (matching record); nothing rewritten


@dataclass(frozen=True)
class PublishFailure:
    shard: int
    message: str
    details: dict[str, Any]


class _Latest(NamedTuple):
    """A shard's latest publish record, as much of it as the reuse check and the totals need."""

    fp: str
    after: bytes | None  # the basis after this shard (raw sha256); None while being rewritten
    rows_in: int
    rows_out: int
    duplicates: int

    def replaces(self) -> dict[str, int]:
        return {"rows_in": self.rows_in, "rows_out": self.rows_out, "duplicates": self.duplicates}


class Publisher:
    """Publishes final shards in order; lives in one Ray actor for the whole run.

    `publish(shards, compose_shas, chain)` takes a run of consecutive ready shards. `chain` is what the
    caller saw published in this run before the call (shard ranges); a publisher restarted mid-run (Ray
    `max_restarts`) resumes from it and the ledger: the running basis from the ledger record of the chain's
    last shard, the key index from `publish/_index/` plus the key files of the chain's shards it does not
    hold yet (the last few). `compose_shas` (shard -> sha256 of its compose output, as its marker records
    it) spares a marker read per shard; shards left out are read from their markers."""

    def __init__(self, rundir: RunDir, compose_stage: str | None, compose_fp: str | None,
                 metadata: Mapping[bytes, bytes] | None = None, workdir: str | None = None):
        self.rundir = rundir
        self.stage = compose_stage
        self.fp = compose_fp
        self.metadata = dict(metadata or {})
        self.workdir = workdir
        self.ledger: LedgerWriter | None = None
        self.latest: dict[int, _Latest] = {}
        self.index: KeyIndex | None = None
        self.loaded = ShardRanges()  # chain shards whose keys the index holds (or that have none)
        self.chain = ShardRanges()  # shards published or kept in this run, in order
        self.basis = GENESIS
        self.last = -1
        self.legacy = False  # a run directory of the per-shard-record layout: stale files found by listing
        self._holders: dict[int, frozenset[str]] = {}

    # --- opening -----------------------------------------------------------------------------------
    def _open(self) -> LedgerWriter:
        if self.ledger is not None:
            return self.ledger
        writer = LedgerWriter(self.rundir, PUBLISH, PublishFold)
        fold = writer.fold
        assert isinstance(fold, PublishFold)
        self.legacy = fold.records == 0 and bool(self.rundir.final_shards())
        self.latest = self._scan(writer, fold)
        self.ledger = writer
        return writer

    def _scan(self, writer: LedgerWriter, fold: PublishFold) -> dict[int, _Latest]:
        """The latest record of every published shard, from the segments that hold them."""
        segments = ShardRanges()
        for t in fold.by_fp.values():
            segments.update(t.segments)
        latest: dict[int, _Latest] = {}
        for n in segments:
            if n == writer.segment:
                records = [json.loads(line) for line in writer.lines]
            else:
                records = read_segment(self.rundir, PUBLISH, n) or []
            for rec in records:
                shard = int(rec["shard"])
                if rec.get("removing") or rec.get("removed"):
                    latest.pop(shard, None)
                elif rec.get("writing"):
                    latest[shard] = _Latest(str(rec["fp"]), None, 0, 0, 0)
                else:
                    after = bytes.fromhex(next_basis(rec["basis"], shard, rec["compose_sha256"]))
                    latest[shard] = _Latest(str(rec["fp"]), after, int(rec["rows_in"]), int(rec["rows_out"]),
                                            int(rec["duplicates"]))
        # a record seen here may have been superseded in a segment not read (a fingerprint with nothing
        # published any more): the fold is the truth about which shard has which final file
        return {s: lat for s, lat in latest.items() if lat.fp in fold.by_fp and s in fold.by_fp[lat.fp].published}

    def _resume(self, chain: ShardRanges) -> None:
        """Continue a run another instance of this publisher started (it died): `chain` was published."""
        if not chain or chain.max() <= self.last:
            return
        last = chain.max()
        lat = self.latest.get(last)
        if lat is None or lat.after is None or lat.fp != self.fp:
            raise RuntimeError(f"cannot resume publishing after {shard_name(last)}: the publish ledger under "
                               f"{self.rundir.url(PUBLISH)} has no record of it")
        log.info("publisher resumes after %s (%d shards published in this run)", shard_name(last), len(chain))
        if self.index is not None:
            self.index.close()
            self.index = None
        self.chain, self.basis, self.last = chain.copy(), lat.after.hex(), last

    # --- publishing --------------------------------------------------------------------------------
    def publish(self, shards: int | Sequence[int], compose_shas: Mapping[int, str] | None = None,
                chain: str | None = None) -> Any:
        """Publish `shards` (ascending; each above every shard published before by this publisher), whose
        compose outputs are committed. Returns a `PublishReport` or `PublishFailure` per shard (a single
        shard given as an int: its `PublishReport`, or the error raised)."""
        single = isinstance(shards, (int, np.integer))
        batch = [int(shards)] if single else [int(s) for s in shards]
        writer = self._open()
        if chain is not None:
            self._resume(ShardRanges.parse(chain))
        if batch != sorted(set(batch)) or (batch and batch[0] <= self.last):
            raise ValueError(f"shards are published in order: {batch} after {self.last}")
        shas, failed = self._compose_shas(batch, compose_shas or {})
        out: list[PublishReport | PublishFailure] = []
        try:
            for shard in batch:
                if shard in failed:
                    out.append(failed[shard])
                    continue
                try:
                    out.append(self._publish_one(shard, shas, batch))
                except Exception as e:  # noqa: BLE001 - the shard fails, later ones go on
                    if single:
                        raise
                    log.exception("publishing %s failed", shard_name(shard))
                    out.append(PublishFailure(shard, f"cannot publish {shard_name(shard)}: {e}",
                                              {"error_type": type(e).__name__}))
        finally:
            with_retries(writer.flush, what=f"write the publish ledger under {self.rundir.url(PUBLISH)}")
            if self.index is not None:
                self.index.persist()
        if single:
            if isinstance(out[0], PublishFailure):
                raise RuntimeError(out[0].message)
            return out[0]
        return out

    def _compose_shas(self, batch: list[int], given: Mapping[int, str]) -> tuple[dict[int, str], dict[int, PublishFailure]]:
        shas = {s: given[s] for s in batch if s in given}
        missing = [s for s in batch if s not in shas]
        failed: dict[int, PublishFailure] = {}
        if missing:
            assert self.stage is not None and self.fp is not None
            paths = {s: self.rundir.marker_path(self.stage, self.fp, s) for s in missing}
            blobs = with_retries(lambda: self.rundir.fs.cat(list(paths.values()), on_error="omit"),
                                 what=f"read the {self.stage} markers of {len(missing)} shard(s)")
            blobs = {self.rundir.fs._strip_protocol(p): b for p, b in blobs.items()}
            for s in missing:
                try:
                    marker = json.loads(blobs[self.rundir.fs._strip_protocol(paths[s])])
                    shas[s] = marker["files"][f"{shard_name(s)}.parquet"]["sha256"]
                except (KeyError, TypeError, ValueError):
                    failed[s] = PublishFailure(s, f"no committed {self.stage} output of {shard_name(s)} under "
                                                  f"{self.fp}", {"error_type": "KeyError"})
        return shas, failed

    def _reusable(self, shard: int, after: str) -> bool:
        lat = self.latest.get(shard)
        return lat is not None and lat.fp == self.fp and lat.after == bytes.fromhex(after)

    def _publish_one(self, shard: int, shas: Mapping[int, str], batch: Sequence[int]) -> PublishReport:
        after = next_basis(self.basis, shard, shas[shard])
        if self._reusable(shard, after):
            lat = self.latest[shard]
            report = PublishReport(shard, lat.rows_in, lat.rows_out, lat.duplicates, True)
        else:
            self._materialize()
            self._mark_rewrites(shard, shas, batch)
            report = self._write(shard, shas[shard], self.basis, after)
        self.chain.add(shard)
        self.basis, self.last = after, shard
        return report

    def _materialize(self) -> None:
        """Have the index hold exactly the keys of this run's chain so far: open it from the run directory
        (first time), forget shards not in the chain (before any final file is rewritten), and add the keys
        of chain shards it lacks (the last few before it was persisted, or shards kept since)."""
        if self.index is None:
            self.index = KeyIndex.open(IndexStore(self.rundir, INDEX_FOLDER), self._workdir())
            if self.index.restrict(self.chain):
                self.index.persist()
            self.loaded = self.index.covered().intersection(self.chain)
        need = self.chain.difference(self.loaded)
        if not need:
            return
        with_keys = [s for s in need if s not in self.latest or self.latest[s].rows_out > 0]
        if with_keys:
            blobs = with_retries(lambda: self.rundir.cat_many({s: self._path(s, "keys") for s in with_keys}),
                                 what=f"read the key files of {len(with_keys)} published shard(s)")
            for s in with_keys:
                self.index.add(np.frombuffer(blobs[s], dtype="<u8").astype(np.uint64), s)
            log.info("key index: added the keys of %d published shard(s) it did not hold", len(with_keys))
        self.loaded.update(need)

    def _workdir(self) -> str:
        """The index's local folder (downloaded runs of a remote run directory), one per run directory so
        that a publisher restarted on the same node clears what its predecessor left."""
        workdir = self.workdir or os.path.join(
            tempfile.gettempdir(), f"grit-publish-{hashlib.sha256(self.rundir.uri.encode()).hexdigest()[:16]}")
        shutil.rmtree(workdir, ignore_errors=True)
        os.makedirs(workdir, exist_ok=True)
        return workdir

    def _mark_rewrites(self, shard: int, shas: Mapping[int, str], batch: Sequence[int]) -> None:
        """Before a published final file is replaced, its record stops matching: a `writing` record for
        every shard of this call from `shard` on that will be rewritten, in one ledger write."""
        basis, marks = self.basis, []
        for s in batch[batch.index(shard):]:
            if s not in shas:
                continue
            after = next_basis(basis, s, shas[s])
            lat = self.latest.get(s)
            if (s == shard or not self._reusable(s, after)) and lat is not None and lat.after is not None:
                marks.append(s)
            basis = after
        if not marks:
            return
        assert self.ledger is not None
        self.ledger.append({"shard": s, "fp": self.fp, "writing": True, "replaces": self.latest[s].replaces()}
                           for s in marks)
        with_retries(self.ledger.flush, what=f"write the publish ledger under {self.rundir.url(PUBLISH)}")
        for s in marks:
            self.latest[s] = _Latest(str(self.fp), None, 0, 0, 0)

    def _write(self, shard: int, compose_sha: str, basis: str, after: str) -> PublishReport:
        rd = self.rundir
        assert self.index is not None and self.ledger is not None and self.stage and self.fp
        table = with_retries(lambda: rd.read_table(self.stage, self.fp, shard),
                             what=f"read {rd.url('stages', self.stage, self.fp, shard_name(shard) + '.parquet')}")
        keys = table["key"].to_pylist()
        hashes = key_hashes(keys)
        idx, holders = self.index.holders(hashes)
        holder_of = np.full(len(keys), -1, np.int64)
        for h in np.unique(holders):  # confirm each hash hit against the holder's real keys
            real = self._keys_of(int(h))
            for i in idx[holders == h]:
                if keys[i] in real and (holder_of[i] < 0 or h < holder_of[i]):
                    holder_of[i] = h
        duplicate = holder_of >= 0
        final = table.filter(pa.array(~duplicate)) if duplicate.any() else table
        final = final.replace_schema_metadata({**(final.schema.metadata or {}), **self.metadata})
        dup_rows = np.flatnonzero(duplicate)
        rejects = pa.table({
            "key": pa.array([keys[i] for i in dup_rows], pa.string()),
            "stage": pa.array([PUBLISH] * len(dup_rows), pa.string()),
            "reason": pa.array([RejectReason.DUPLICATE_KEY.value] * len(dup_rows), pa.string()),
            "detail": pa.array([f"key also in {shard_name(int(holder_of[i]))}, which is kept" for i in dup_rows],
                               pa.string()),
        }, schema=REJECT_SCHEMA)
        kept_hashes = np.sort(hashes[~duplicate])
        final_bytes = parquet_bytes(final.combine_chunks())
        rd.put_atomic(rd.final_path(shard), final_bytes)
        rd.put_atomic(self._path(shard, "rejects.parquet"), parquet_bytes(rejects))
        rd.put_atomic(self._path(shard, "keys"), kept_hashes.astype("<u8").tobytes())
        self._holders.pop(shard, None)
        dups = int(duplicate.sum())
        record: dict[str, Any] = {
            "shard": shard, "fp": self.fp, "compose_sha256": compose_sha, "basis": basis,
            "final_sha256": sha256(final_bytes), "rows_in": table.num_rows, "rows_out": final.num_rows,
            "duplicates": dups}
        if shard in self.latest:
            record["replaces"] = self.latest[shard].replaces()
        self.ledger.append([record])
        self.latest[shard] = _Latest(self.fp, bytes.fromhex(after), table.num_rows, final.num_rows, dups)
        self.index.add(kept_hashes, shard)
        self.loaded.add(shard)
        return PublishReport(shard, table.num_rows, final.num_rows, dups, False)

    def _keys_of(self, shard: int) -> frozenset[str]:
        if shard not in self._holders:
            keys = with_retries(lambda: pq.read_table(self.rundir.final_path(shard), columns=["key"],
                                                      filesystem=self.rundir.fs),
                                what=f"read the keys of {self.rundir.url(FINAL, shard_name(shard) + '.parquet')}")
            if len(self._holders) >= HOLDER_CACHE:
                self._holders.pop(next(iter(self._holders)))
            self._holders[shard] = frozenset(keys["key"].to_pylist())
        return self._holders[shard]

    def _path(self, shard: int, suffix: str) -> str:
        return publish_path(self.rundir, shard, suffix)

    # --- the end of a run --------------------------------------------------------------------------
    def finish(self) -> list[int]:
        """The run published everything it will: persist the index (so the next run opens it whole) and
        delete the final shards published earlier that this run did not publish (known from the ledger; a
        run directory of the older per-shard-record layout is listed once). Returns the shards removed.
        The publisher is done after this."""
        writer = self._open()
        if self.index is not None:
            self.index.flush()
        fold = writer.fold
        assert isinstance(fold, PublishFold)
        stale = fold.published().difference(self.chain)
        redo = fold.removing.copy()
        legacy: list[int] = []
        if self.legacy:
            legacy = [s for s in self.rundir.final_shards() if s not in self.chain and s not in stale]
        if stale:
            self._forget(stale)
            writer.append({"shard": s, "removing": True, **({"replaces": self.latest[s].replaces()}
                                                             if s in self.latest else {})} for s in stale)
            with_retries(writer.flush, what=f"write the publish ledger under {self.rundir.url(PUBLISH)}")
        gone = sorted({*stale, *redo, *legacy})
        for s in gone:
            for path in (self.rundir.final_path(s), self._path(s, "rejects.parquet"), self._path(s, "keys")):
                try:
                    self.rundir.fs.rm(path)
                except FileNotFoundError:
                    pass
            self.latest.pop(s, None)
        removed_records = [{"shard": s, "removed": True} for s in sorted({*stale, *redo})]
        if removed_records:
            writer.append(removed_records)
            with_retries(writer.flush, what=f"write the publish ledger under {self.rundir.url(PUBLISH)}")
        if self.legacy:
            self._remove_legacy_files()
        self.close()
        return sorted({*stale, *legacy})

    def _forget(self, shards: ShardRanges) -> None:
        """Drop `shards` from the persisted index's valid sets before their files go."""
        if self.index is not None:
            keep = self.index.covered().difference(shards)
            if self.index.restrict(keep):
                self.index.persist()
            return
        store = IndexStore(self.rundir, INDEX_FOLDER)
        manifest = store.read_manifest()
        if manifest is None:
            return
        runs = manifest["runs"]
        for r in runs:
            r["valid"] = str(ShardRanges.parse(r.get("valid", "")).difference(shards))
        self.rundir.put_atomic(store.path("manifest.json"), json_bytes({**manifest, "runs": runs}))

    def _remove_legacy_files(self) -> None:
        """The per-shard records of the older layout (publish/shard-N.json), and its `grit/_manifest.json`."""
        for name in self.rundir.list_names(PUBLISH):
            stem = name.split(".", 1)[0]
            if not (stem.startswith("shard-") and stem[6:].isdigit()):
                continue
            if name.endswith(".json") or int(stem[6:]) not in self.chain:
                self.rundir.fs.rm(self.rundir.path(PUBLISH, name))
        legacy = self.rundir.path(FINAL, "_manifest.json")
        if self.rundir.fs.exists(legacy):
            self.rundir.fs.rm(legacy)

    def close(self) -> None:
        """Let go of the index; the local folder it made (copies of a remote run directory's runs; empty for
        a local one, whose runs stay in place) is deleted."""
        if self.index is not None:
            self.index.close()
            if self.workdir is None:
                shutil.rmtree(self.index.workdir, ignore_errors=True)
            self.index = None


def publish_path(rundir: RunDir, shard: int, suffix: str) -> str:
    """`publish/shard-NNNNN.<suffix>`: duplicate-key rejects (rejects.parquet), kept key hashes (keys)."""
    return rundir.path(PUBLISH, f"{shard_name(shard)}.{suffix}")


def remove_stale(rundir: RunDir, keep: Iterable[int]) -> list[int]:
    """Delete the final shards (and their publish files) published earlier and not in `keep`, as the
    publish ledger knows them; returns what was removed. (`Publisher.finish` does this for a run.)"""
    publisher = Publisher(rundir, None, None)
    publisher._open()
    publisher.chain = ShardRanges(keep)
    try:
        return publisher.finish()
    finally:
        publisher.close()

