"""The publisher's index of published keys: 64-bit key hashes -> the shard holding each, for a run of
billions of keys (`grit_pipeline.engine.publish` asks it, per shard, which of its keys were published
before).

A log-structured merge (LSM) index, on the publisher's local disk and persisted in the run directory:

- **Sorted runs.** Keys enter a small in-memory table (the last few shards); when it holds
  `MEMTABLE_KEYS` keys or `MEMTABLE_SHARDS` shards it is written out as a sorted run: one file of the
  hashes (uint64, sorted) followed by their shards (int32), memory-mapped. Runs of about the same size
  (`FANOUT` of them in one size tier) are merged into one, streaming (`kway_merge`, bounded memory), so
  there are O(log N) runs and each key is rewritten O(log N) times.
- **One filter in memory.** A blocked Bloom filter over every hash (one 64-bit word per key, `FILTER_K`
  bits set in it; `FILTER_BITS` to 2x that many bits per key as it grows) answers "never published" for
  almost every key of a shard with one memory access; only its positives (true duplicates plus about 1%)
  are searched in the runs. So a shard's check costs O(R) plus O(positives x runs x log N), whatever N.
- **Validity.** Each run says which shards its entries are valid for (`valid`, shard ranges). A shard
  republished, skipped or removed is dropped from those sets (`restrict`) and its entries from the next
  merge; the index never answers with an entry of a shard not in the caller's chain.
- **Persistence.** Every run written is also stored in the run directory (`<run>/publish/_index/`,
  `IndexStore`) and named in `manifest.json` (runs, their key counts and valid shards), so a restarted
  publisher opens the index from O(log N) objects (`KeyIndex.open`) plus the key files of the shards of
  its in-memory table. On a local run directory the run files are used where they lie (no copy).

Memory held in the process: the filter (1.5-3 bytes per key: `FILTER_BITS` = 12 bits per key just before
it grows, twice that just after) plus the in-memory table (at most `MEMTABLE_KEYS` x 16 bytes, 4 MiB) and
a merge's buffers (`FANOUT` x `MERGE_CHUNK` x 12 bytes, 48 MiB, only while merging). The runs (12 bytes per
key) are memory-mapped files: pages of the OS page cache, read on demand and dropped under pressure.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from grit_pipeline.rundir.store import RunDir, json_bytes
from grit_pipeline.shard_ranges import ShardRanges

log = logging.getLogger(__name__)

MEMTABLE_KEYS = 1 << 18  # keys of the last shards kept in memory before they become a run
MEMTABLE_SHARDS = 32  # ... or this many shards (tiny shards would otherwise make one run per shard)
FANOUT = 4  # runs of one size tier merged at once
MERGE_CHUNK = 1 << 20  # entries read from each run per step of a merge
FILTER_BITS = 12  # the filter has at least this many bits per key; it doubles when it would have fewer
FILTER_K = 5  # bits set per key in its filter word
FIRST_CAPACITY = 1 << 20  # keys the first filter is sized for
MANIFEST = "manifest.json"
FORMAT = 1
HASH = np.dtype("<u8")
SHARD = np.dtype("<i4")


# --- the filter ------------------------------------------------------------------------------------
class HashFilter:
    """A blocked Bloom filter of 64-bit hashes: each hash picks one 64-bit word (from its top 32 bits, so
    sorted hashes fill the words in order) and sets `FILTER_K` bits in it (from its low 30 bits)."""

    def __init__(self, capacity: int):
        self.nwords = max(1024, -(-capacity * FILTER_BITS // 64))
        self.capacity = self.nwords * 64 // FILTER_BITS
        self.words = np.zeros(self.nwords, np.uint64)

    def _locate(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        word = ((hashes >> np.uint64(32)) * np.uint64(self.nwords)) >> np.uint64(32)
        mask = np.zeros(len(hashes), np.uint64)
        for i in range(FILTER_K):
            mask |= np.uint64(1) << ((hashes >> np.uint64(6 * i)) & np.uint64(63))
        return word.astype(np.intp), mask

    def add_sorted(self, hashes: np.ndarray) -> None:
        """Add hashes given in ascending order (their words then ascend too)."""
        if len(hashes) == 0:
            return
        word, mask = self._locate(hashes)
        starts = np.flatnonzero(np.diff(word)) + 1
        starts = np.concatenate([[0], starts])
        self.words[word[starts]] |= np.bitwise_or.reduceat(mask, starts)

    def might_contain(self, hashes: np.ndarray) -> np.ndarray:
        word, mask = self._locate(hashes)
        return (self.words[word] & mask) == mask

    @property
    def nbytes(self) -> int:
        return self.words.nbytes


# --- merging sorted streams -------------------------------------------------------------------------
Chunks = Iterator[tuple[np.ndarray, np.ndarray]]  # (hashes ascending, shards) in pieces, ascending across pieces


def kway_merge(sources: Sequence[Chunks]) -> Chunks:
    """Merge sorted streams of (hash, shard) pieces into one sorted stream, holding one piece of each
    source at a time. The same inputs in the same pieces always give the same output."""
    bufs: list[list[np.ndarray]] = []
    iters: list[Chunks] = []
    for it in sources:
        piece = _next_piece(it)
        if piece is not None:
            bufs.append(list(piece))
            iters.append(it)
    if len(bufs) == 1:
        yield bufs[0][0], bufs[0][1]
        yield from iters[0]
        return
    while bufs:
        bound = min(b[0][-1] for b in bufs)  # everything <= bound in any buffer can go out now
        hs, ss = [], []
        keep_b, keep_i = [], []
        for buf, it in zip(bufs, iters, strict=True):
            k = int(np.searchsorted(buf[0], bound, side="right"))
            if k:
                hs.append(buf[0][:k])
                ss.append(buf[1][:k])
                buf[0], buf[1] = buf[0][k:], buf[1][k:]
            if len(buf[0]) == 0:
                piece = _next_piece(it)
                if piece is None:
                    continue
                buf[0], buf[1] = piece
            keep_b.append(buf)
            keep_i.append(it)
        bufs, iters = keep_b, keep_i
        h = np.concatenate(hs)
        s = np.concatenate(ss)
        order = np.argsort(h, kind="stable")
        yield h[order], s[order]


def _next_piece(it: Chunks) -> tuple[np.ndarray, np.ndarray] | None:
    for h, s in it:
        if len(h):
            return h, s
    return None


def in_ranges(shards: np.ndarray, ranges: ShardRanges) -> np.ndarray:
    """(n,) bool: which of `shards` are in `ranges` (vectorized over the range bounds)."""
    lo, hi = ranges.bounds()
    if not lo:
        return np.zeros(len(shards), dtype=bool)
    lo_a, hi_a = np.asarray(lo, np.int64), np.asarray(hi, np.int64)
    i = np.searchsorted(lo_a, shards, side="right") - 1
    ok = i >= 0
    ok[ok] = shards[ok] <= hi_a[i[ok]]
    return ok


# --- runs -------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Run:
    """One sorted run: `keys` entries in a file of hashes (uint64) then shards (int32)."""

    name: str
    keys: int
    valid: ShardRanges
    path: str  # the local file
    hashes: np.ndarray | None = None
    shards: np.ndarray | None = None

    def map(self) -> Run:
        if self.keys:
            mm = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(self.keys * 12,))
            self.hashes = mm[: self.keys * 8].view(HASH)
            self.shards = mm[self.keys * 8:].view(SHARD)
        else:
            self.hashes, self.shards = np.empty(0, HASH), np.empty(0, SHARD)
        return self

    def unmap(self) -> None:
        self.hashes = self.shards = None

    def chunks(self, valid_only: bool = True) -> Chunks:
        assert self.hashes is not None and self.shards is not None
        for i in range(0, self.keys, MERGE_CHUNK):
            h = np.asarray(self.hashes[i:i + MERGE_CHUNK])
            s = np.asarray(self.shards[i:i + MERGE_CHUNK])
            if valid_only:
                ok = in_ranges(s, self.valid)
                if not ok.all():
                    h, s = h[ok], s[ok]
            yield h, s

    def valid_keys(self) -> int:
        assert self.shards is not None
        return sum(int(in_ranges(np.asarray(self.shards[i:i + MERGE_CHUNK]), self.valid).sum())
                   for i in range(0, self.keys, MERGE_CHUNK))

    def tier(self) -> int:
        return int(math.log(max(self.keys, 1), FANOUT))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "keys": self.keys, "valid": str(self.valid)}


def write_run(path: str, chunks: Iterable[tuple[np.ndarray, np.ndarray]], keys: int) -> None:
    """Write `keys` sorted entries, given in pieces, as a run file at `path`."""
    if keys == 0:
        open(path, "wb").close()
        return
    mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=(keys * 12,))
    hashes, shards = mm[: keys * 8].view(HASH), mm[keys * 8:].view(SHARD)
    at = 0
    for h, s in chunks:
        hashes[at:at + len(h)] = h
        shards[at:at + len(h)] = s
        at += len(h)
    if at != keys:
        raise RuntimeError(f"index run {path}: wrote {at} entries, expected {keys}")
    del mm, hashes, shards


# --- where runs persist -----------------------------------------------------------------------------
class IndexStore:
    """The index's objects in the run directory: `<folder>/manifest.json` and `<folder>/run-NNNNNN.idx`.
    On a local run directory the run files are the working copies (memory-mapped where they lie); on an
    object store each run is uploaded once written and downloaded by a publisher that opens the index."""

    def __init__(self, rundir: RunDir, folder: str):
        self.rundir = rundir
        self.folder = folder.strip("/")
        self.local = rundir.renames

    def path(self, name: str) -> str:
        return self.rundir.path(self.folder, name)

    def read_manifest(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.rundir.read_bytes(self.path(MANIFEST)))
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("%s is not JSON; the key index is rebuilt", self.rundir.url(self.folder, MANIFEST))
            return None
        return data if isinstance(data, dict) and data.get("format") == FORMAT else None

    def write_manifest(self, runs: Sequence[Run], counter: int) -> None:
        self.rundir.put_atomic(self.path(MANIFEST), json_bytes({
            "format": FORMAT, "next": counter, "runs": [r.describe() for r in runs]}))

    def scratch(self, workdir: str, name: str) -> str:
        """Where to write a new run before `commit`."""
        if self.local:
            os.makedirs(self.rundir.path("_tmp"), exist_ok=True)
            return self.rundir.path("_tmp", f"{name}.{uuid.uuid4().hex}")
        return os.path.join(workdir, f"{name}.part")

    def commit(self, scratch: str, workdir: str, name: str) -> str:
        """Put a written run in place (atomically); returns its local path."""
        if self.local:
            self.rundir.fs.makedirs(self.rundir.path(self.folder), exist_ok=True)
            self.rundir.fs.mv(scratch, self.path(name))
            return self.path(name)
        self.rundir.fs.put_file(scratch, self.path(name))
        local = os.path.join(workdir, name)
        os.replace(scratch, local)
        return local

    def fetch(self, workdir: str, name: str) -> str:
        if self.local:
            return self.path(name)
        local = os.path.join(workdir, name)
        self.rundir.fs.get_file(self.path(name), local)
        return local

    def remove(self, names: Iterable[str]) -> None:
        for name in names:
            try:
                self.rundir.fs.rm(self.path(name))
            except FileNotFoundError:
                pass

    def names(self) -> list[str]:
        return [n for n in self.rundir.list_names(self.folder) if n.startswith("run-")]


# --- the index --------------------------------------------------------------------------------------
class KeyIndex:
    """Hashes of published keys -> the shards holding them. See the module docstring."""

    def __init__(self, store: IndexStore | None = None, workdir: str | None = None):
        self.store = store
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="grit-keyindex-")
        os.makedirs(self.workdir, exist_ok=True)
        self.filter = HashFilter(FIRST_CAPACITY)
        self.entries = 0  # entries in the filter (runs + memtable)
        self.mem: list[tuple[np.ndarray, int]] = []  # (sorted hashes, shard): the last shards
        self.mem_keys = 0
        self.runs: list[Run] = []
        self.counter = 0  # next run number
        self.dirty = False  # the valid sets changed since the manifest was written

    @classmethod
    def open(cls, store: IndexStore, workdir: str | None = None) -> KeyIndex:
        """The index as the run directory holds it (empty if it holds none): manifest + run files."""
        index = cls(store, workdir)
        manifest = store.read_manifest()
        if manifest is None:
            return index
        index.counter = int(manifest.get("next", 0))
        listed = set(manifest_names := [r["name"] for r in manifest["runs"]])
        for r in manifest["runs"]:
            path = store.fetch(index.workdir, r["name"])
            run = Run(r["name"], int(r["keys"]), ShardRanges.parse(r.get("valid", "")), path).map()
            index.runs.append(run)
            index.entries += run.keys
        stray = [n for n in store.names() if n not in listed]  # a crash between a merge and its cleanup
        store.remove(stray)
        index._rebuild_filter(max(FIRST_CAPACITY, index.entries * 2))
        log.info("key index opened: %d runs (%s), %d keys", len(manifest_names), ", ".join(manifest_names),
                 index.entries)
        return index

    def __len__(self) -> int:
        return self.entries

    # --- adding ------------------------------------------------------------------------------------
    def add(self, hashes: np.ndarray, shard: int) -> None:
        """Add the hashes of `shard`'s kept keys."""
        hashes = np.sort(np.asarray(hashes, dtype=np.uint64))
        self._grow(len(hashes))
        self.filter.add_sorted(hashes)
        self.entries += len(hashes)
        self.mem.append((hashes, int(shard)))
        self.mem_keys += len(hashes)
        if self.mem_keys >= MEMTABLE_KEYS or len(self.mem) >= MEMTABLE_SHARDS:
            self.flush()

    def add_run(self, hashes: np.ndarray, shards: np.ndarray) -> None:
        """Bulk-load (hash, shard) entries as one run (benchmarks; a rebuilt index)."""
        order = np.argsort(hashes, kind="stable")
        h, s = np.asarray(hashes, HASH)[order], np.asarray(shards, SHARD)[order]
        self.bulk_load(iter([(h, s)]), len(h), ShardRanges(np.unique(s).tolist()))

    def bulk_load(self, pieces: Iterable[tuple[np.ndarray, np.ndarray]], keys: int, valid: ShardRanges) -> None:
        """Bulk-load `keys` entries given as pieces sorted by hash (ascending across pieces) as one run."""
        self._grow(keys)

        def feed() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for h, s in pieces:
                self.filter.add_sorted(h)
                yield h, s

        self.entries += keys
        self._new_run(feed(), keys, valid)
        self._compact()

    def flush(self) -> None:
        """Write the in-memory shards out as a run (and persist it)."""
        if not self.mem:
            return
        h = np.concatenate([m[0] for m in self.mem])
        s = np.concatenate([np.full(len(m[0]), m[1], SHARD) for m in self.mem])
        order = np.argsort(h, kind="stable")
        valid = ShardRanges(m[1] for m in self.mem if len(m[0]))
        self.mem, self.mem_keys = [], 0
        if len(h) == 0:  # shards with no key: nothing to look up
            return
        self._new_run(iter([(h[order], s[order])]), len(h), valid)
        self._compact()

    def _new_run(self, chunks: Iterable[tuple[np.ndarray, np.ndarray]], keys: int, valid: ShardRanges) -> Run:
        name = f"run-{self.counter:06d}.idx"
        self.counter += 1
        if self.store is not None:
            scratch = self.store.scratch(self.workdir, name)
            write_run(scratch, chunks, keys)
            path = self.store.commit(scratch, self.workdir, name)
        else:
            path = os.path.join(self.workdir, name)
            write_run(path, chunks, keys)
        run = Run(name, keys, valid, path).map()
        self.runs.append(run)
        return run

    def _compact(self) -> None:
        """Merge `FANOUT` runs of one size tier while there are such, then persist the manifest."""
        while True:
            tiers: dict[int, list[Run]] = {}
            for run in self.runs:
                tiers.setdefault(run.tier(), []).append(run)
            full = next((runs for _, runs in sorted(tiers.items()) if len(runs) >= FANOUT), None)
            if full is None:
                break
            self._merge(full[:FANOUT])
        self.persist(force=True)

    def _merge(self, runs: list[Run]) -> None:
        keys = sum(r.valid_keys() for r in runs)
        valid = ShardRanges()
        for r in runs:
            valid.update(r.valid)
        gone = {id(r) for r in runs}
        if keys:
            self._new_run(kway_merge([r.chunks() for r in runs]), keys, valid)
        dropped = sum(r.keys for r in runs) - keys
        self.runs = [r for r in self.runs if id(r) not in gone]
        if self.store is not None:  # the merged run replaces them in the manifest first, then they go
            self.store.write_manifest(self.runs, self.counter)
        for r in runs:
            r.unmap()
            if self.store is None:
                os.remove(r.path)
            elif not self.store.local and os.path.exists(r.path):
                os.remove(r.path)
        if self.store is not None:
            self.store.remove(r.name for r in runs)
        if dropped:
            self.entries -= dropped  # the filter keeps their bits until it is rebuilt: false positives only

    def _grow(self, more: int) -> None:
        if self.entries + more > self.filter.capacity:
            self._rebuild_filter(2 * (self.entries + more))

    def _rebuild_filter(self, capacity: int) -> None:
        self.filter = HashFilter(capacity)
        for run in self.runs:
            for h, _ in run.chunks(valid_only=False):
                self.filter.add_sorted(h)
        for h, _ in self.mem:
            self.filter.add_sorted(h)

    # --- validity ----------------------------------------------------------------------------------
    def restrict(self, keep: ShardRanges) -> bool:
        """Forget every entry of a shard not in `keep`; True if anything was forgotten."""
        changed = False
        for run in self.runs:
            valid = run.valid.intersection(keep)
            if valid != run.valid:
                run.valid, changed = valid, True
        mem = [m for m in self.mem if m[1] in keep]
        if len(mem) != len(self.mem):
            self.mem, self.mem_keys, changed = mem, sum(len(m[0]) for m in mem), True
        self.dirty |= changed
        return changed

    def covered(self) -> ShardRanges:
        """The shards whose keys the index holds."""
        out = ShardRanges(m[1] for m in self.mem)
        for run in self.runs:
            out.update(run.valid)
        return out

    def persist(self, force: bool = False) -> None:
        """Write the manifest (the runs and their valid shards) if anything changed."""
        if self.store is not None and (self.dirty or force):
            self.store.write_manifest(self.runs, self.counter)
        self.dirty = False

    # --- lookups -----------------------------------------------------------------------------------
    def holders(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every (i, shard) with hashes[i] held by `shard` (several when 64-bit hashes collide)."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        if len(hashes) == 0 or self.entries == 0:
            return np.empty(0, np.intp), np.empty(0, np.int64)
        cand = np.flatnonzero(self.filter.might_contain(hashes))
        if len(cand) == 0:
            return np.empty(0, np.intp), np.empty(0, np.int64)
        q = hashes[cand]
        out_i: list[np.ndarray] = []
        out_s: list[np.ndarray] = []
        for h, shard in self.mem:
            pos = np.minimum(np.searchsorted(h, q), len(h) - 1) if len(h) else None
            if pos is not None:
                hit = h[pos] == q
                out_i.append(cand[hit])
                out_s.append(np.full(int(hit.sum()), shard, np.int64))
        for run in self.runs:
            if not run.keys:
                continue
            assert run.hashes is not None and run.shards is not None
            left = np.searchsorted(run.hashes, q, side="left")
            right = np.searchsorted(run.hashes, q, side="right")
            for j in np.flatnonzero(right > left):  # few: true duplicates and hash collisions
                shards = np.asarray(run.shards[left[j]:right[j]], np.int64)
                shards = shards[in_ranges(shards, run.valid)]
                out_i.append(np.full(len(shards), cand[j], np.intp))
                out_s.append(shards)
        if not out_i:
            return np.empty(0, np.intp), np.empty(0, np.int64)
        return np.concatenate(out_i).astype(np.intp), np.concatenate(out_s).astype(np.int64)

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """For each hash the lowest shard holding it, or -1."""
        out = np.full(len(hashes), np.iinfo(np.int64).max, np.int64)
        idx, shards = self.holders(hashes)
        np.minimum.at(out, idx, shards)
        out[out == np.iinfo(np.int64).max] = -1
        return out

    # --- accounting --------------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes this index holds in process memory (not counting the memory-mapped runs)."""
        return self.filter.nbytes + sum(m[0].nbytes for m in self.mem)

    def disk_bytes(self) -> int:
        return sum(r.keys * 12 for r in self.runs)

    def close(self) -> None:
        for run in self.runs:
            run.unmap()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def index_folder(publish_folder: str) -> str:
    return posixpath.join(publish_folder, "_index")
