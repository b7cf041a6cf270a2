"""The publisher's duplicate check alone at N = 10^6, 10^7, 10^8 published keys: per-shard time and the
bytes per key it holds in memory (`grit_pipeline.engine.key_index`, as `grit_pipeline.engine.publish` uses it).

Synthetic 64-bit key hashes, 10,000 per shard. Times are CPU seconds of this process (the figure that
does not move with other work on a shared machine) and wall seconds, both printed. For each N the index is bulk-loaded with N hashes (one
sorted run written straight to disk, as a merge would leave it), then `--shards` shards are published
against it: the hashes of a new shard (each with a few keys planted from earlier shards) are looked up
(`holders`) and the kept ones added (`add`), which includes the in-memory table's flushes and the merges
they trigger. The real-key confirmation of hits and the Parquet writes are not part of this figure.
`--build` also grows an index from empty through `add` alone, shard by shard, so every merge and filter
rebuild on the way is counted: the amortized per-shard cost.

    python bench/publish_scale.py                          # 10^6, 10^7, 10^8; build through 10^7
    python bench/publish_scale.py --sizes 1000000 --build 0 --out bench/out/publish_scale.json

The same script runs against the index before this one (`KeyIndex` in `grit_pipeline/engine/publish.py`
at commit 33dd3d3: one sorted array, concatenated and re-sorted on every lookup after an add) when run
in a checkout of that commit: it detects which one it has (`impl` in the output).
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import tempfile
import time

import harness  # noqa: E402 - this checkout (or GRIT_REPO) on sys.path, offline environment
import numpy as np  # noqa: E402

from grit_pipeline.engine.publish import KeyIndex  # noqa: E402

PER_SHARD = 10_000
PLANTED = 10  # keys of earlier shards in each new shard: true duplicates the check must find
NEW = hasattr(KeyIndex, "bulk_load")
CHUNK = 1 << 22


def rss() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "VmHWM:")):
                name, value = line.split(":")
                out[name] = int(value.split()[0]) * 1024
    return out


def sorted_pieces(n: int, rng: np.random.Generator):
    """n uniform 64-bit hashes in ascending order, in pieces (bucket by bucket), each with a shard number."""
    buckets = max(1, n // CHUNK)
    span = (1 << 64) // buckets
    for b in range(buckets):
        lo = b * n // buckets
        hi = (b + 1) * n // buckets
        h = np.sort(rng.integers(b * span, (b + 1) * span - 1, hi - lo, dtype=np.uint64, endpoint=True))
        shards = (rng.integers(0, max(1, n // PER_SHARD), hi - lo)).astype(np.int32)
        yield h, shards


def build(n: int, rng: np.random.Generator, workdir: str):
    """An index of n hashes (bulk-loaded); returns it and a sample of held hashes for planting."""
    sample = []
    if NEW:
        from grit_pipeline.shard_ranges import ShardRanges

        index = KeyIndex(workdir=workdir)

        def pieces():
            for h, s in sorted_pieces(n, rng):
                sample.append(h[:: max(1, len(h) // 1000)].copy())
                yield h, s

        index.bulk_load(pieces(), n, ShardRanges.parse(f"0-{max(0, n // PER_SHARD - 1)}"))
    else:  # the old KeyIndex: one sorted array of hashes and one of shards
        index = KeyIndex()
        hs, ss = [], []
        for h, s in sorted_pieces(n, rng):
            sample.append(h[:: max(1, len(h) // 1000)].copy())
            hs.append(h)
            ss.append(s.astype(np.int64))
        index._hashes, index._shards = np.concatenate(hs), np.concatenate(ss)
        del hs, ss
    return index, np.concatenate(sample)


def publish_shards(index, count: int, first_shard: int, held: np.ndarray,
                   rng: np.random.Generator) -> tuple[list[float], list[float]]:
    """Publish `count` shards of PER_SHARD keys (PLANTED of them already held); per-shard (CPU, wall) seconds."""
    times, walls = [], []
    found = 0
    for i in range(count):
        q = rng.integers(0, 2**64 - 1, PER_SHARD, dtype=np.uint64, endpoint=True)
        q[:PLANTED] = rng.choice(held, PLANTED, replace=False)
        c0, t0 = time.process_time(), time.perf_counter()
        if NEW:
            idx, _ = index.holders(q)
            dup = np.zeros(len(q), bool)
            dup[idx] = True
        else:
            dup = index.lookup(q) >= 0
        index.add(q[~dup], first_shard + i)
        times.append(time.process_time() - c0)
        walls.append(time.perf_counter() - t0)
        found += int(dup[:PLANTED].sum())
    if found != count * PLANTED:
        raise SystemExit(f"the check missed planted duplicates: found {found} of {count * PLANTED}")
    return times, walls


def measure(n: int, shards: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="publish-scale-") as workdir:
        t0 = time.perf_counter()
        index, held = build(n, rng, workdir)
        load_s = time.perf_counter() - t0
        gc.collect()
        before = rss()
        times, walls = publish_shards(index, shards, n // PER_SHARD, held, rng)
        after = rss()
        held_bytes = index.memory_bytes() if NEW else index._hashes.nbytes + index._shards.nbytes
        keys = len(index)
        out = {
            "keys": n, "bulk_load_s": round(load_s, 1), "shards_timed": shards,
            "per_shard_cpu_ms_median": round(1e3 * statistics.median(times), 2),
            "per_shard_cpu_ms_mean": round(1e3 * statistics.fmean(times), 2),
            "per_shard_cpu_ms_max": round(1e3 * max(times), 1),
            "per_shard_wall_ms_median": round(1e3 * statistics.median(walls), 2),
            "per_shard_wall_ms_mean": round(1e3 * statistics.fmean(walls), 2),
            "index_bytes_per_key": round(held_bytes / keys, 3),
            "rss_anon_bytes_per_key": round(after["RssAnon"] / keys, 2),
            "rss_anon_mb": round(after["RssAnon"] / 2**20, 1),
            "rss_file_mb": round(after["RssFile"] / 2**20, 1),
            "rss_anon_growth_mb_while_publishing": round((after["RssAnon"] - before["RssAnon"]) / 2**20, 1),
        }
        if NEW:
            out.update(runs=len(index.runs), disk_mb=round(index.disk_bytes() / 2**20, 1))
            index.close()
        del index, held
        gc.collect()
    return out


def build_through(n: int, seed: int) -> dict:
    """Grow an index from empty to n keys through `add` alone (every flush, merge and filter rebuild)."""
    rng = np.random.default_rng(seed)
    shards = n // PER_SHARD
    times = []
    with tempfile.TemporaryDirectory(prefix="publish-build-") as workdir:
        index = KeyIndex(workdir=workdir) if NEW else KeyIndex()
        t0 = time.perf_counter()
        for shard in range(shards):
            q = rng.integers(0, 2**64 - 1, PER_SHARD, dtype=np.uint64, endpoint=True)
            t = time.process_time()
            if NEW:
                idx, _ = index.holders(q)
                keep = np.ones(len(q), bool)
                keep[idx] = False
            else:
                keep = index.lookup(q) < 0
            index.add(q[keep], shard)
            times.append(time.process_time() - t)
        total = time.perf_counter() - t0
        tail = times[-max(1, shards // 10):]
        out = {"keys": n, "shards": shards, "wall_s": round(total, 1), "cpu_s": round(sum(times), 1),
               "per_shard_cpu_ms_mean": round(1e3 * statistics.fmean(times), 2),
               "per_shard_cpu_ms_mean_last_tenth": round(1e3 * statistics.fmean(tail), 2),
               "per_shard_cpu_ms_max": round(1e3 * max(times), 1)}
        if NEW:
            out["runs"] = len(index.runs)
            index.close()
    return out


def main() -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="*", default=[10**6, 10**7, 10**8])
    parser.add_argument("--shards", type=int, default=64, help="shards published and timed at each size")
    parser.add_argument("--build", type=int, default=10**7, help="grow an index to this many keys via add (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    figures: dict = {"impl": "lsm+filter" if NEW else "sorted array (re-sorted per lookup)",
                     "keys_per_shard": PER_SHARD}
    per_size = []
    for n in args.sizes:
        m = measure(n, args.shards, args.seed)
        print(json.dumps(m), flush=True)
        per_size.append(m)
        figures.update({f"n{n:.0e}_{k}".replace("+0", ""): v for k, v in m.items() if k != "keys"})
    if len(per_size) > 1:
        small, large = per_size[0], per_size[-1]
        for what in ("cpu_ms_mean", "cpu_ms_median", "wall_ms_mean"):
            a, b = small[f"per_shard_{what}"], large[f"per_shard_{what}"]
            figures[f"per_shard_{what}_largest_over_smallest_n"] = round(b / a, 2)
    if args.build:
        b = build_through(args.build, args.seed)
        print(json.dumps({"build": b}), flush=True)
        figures.update({f"build_to_{args.build:.0e}_{k}".replace("+0", ""): v for k, v in b.items() if k != "keys"})
    print(json.dumps(figures, indent=1))
    harness.write_figures(figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
