"""`grit validate`'s cross-shard duplicate check at many shards: the k-way merge of sorted key-hash files
(`grit_pipeline.commands.validate`) in bounded memory, against the dict of every key it replaced.

Synthetic key-hash files of 10,000 sorted 64-bit hashes each (as the publisher writes
`publish/shard-N.keys`), a few keys planted in two shards. Prints the merge's seconds and the peak of the memory
it allocates (Python and numpy allocations, `tracemalloc`), for each shard count; the dict figure is the same keys held as
Python strings in one dict (what validate did before), measured at the smallest count only.

    python bench/validate_scale.py                            # 100 and 1,000 shards
    python bench/validate_scale.py --shards 100 --out bench/out/validate_scale.json
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import harness  # noqa: E402 - this checkout (or GRIT_REPO) on sys.path, offline environment
import numpy as np  # noqa: E402

from grit_pipeline.commands import validate as V  # noqa: E402

PER_SHARD = 10_000
PLANTED = 5


def write_files(folder: Path, shards: int, rng: np.random.Generator) -> list[V._Checked]:
    checked = []
    planted = rng.integers(0, 2**64 - 1, PLANTED, dtype=np.uint64, endpoint=True)
    for s in range(shards):
        h = rng.integers(0, 2**64 - 1, PER_SHARD, dtype=np.uint64, endpoint=True)
        if s in (0, shards - 1):
            h[:PLANTED] = planted
        path = folder / f"{s}.keys"
        np.sort(h).astype("<u8").tofile(path)
        checked.append(V._Checked(f"shard-{s}", keys=str(path)))
    return checked


def main() -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("--shards", type=int, nargs="*", default=[100, 1000])
    args = parser.parse_args()
    figures: dict = {"keys_per_shard": PER_SHARD, "merge_fan_in": V.MERGE_FAN_IN, "merge_chunk": V.MERGE_CHUNK}
    rng = np.random.default_rng(0)
    for n in sorted(args.shards):
        with tempfile.TemporaryDirectory(prefix="validate-scale-") as tmp:
            checked = write_files(Path(tmp), n, rng)
            tracemalloc.start()
            t0 = time.perf_counter()
            shared = V._shared_hashes([V._key_chunks(None, c, i) for i, c in enumerate(checked)], tmp)
            seconds = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            if len(shared) != PLANTED or any(v != {0, n - 1} for v in shared.values()):
                raise SystemExit(f"the merge found {shared}, expected {PLANTED} hashes in shards 0 and {n - 1}")
            figures[f"s{n}_keys"] = n * PER_SHARD
            figures[f"s{n}_merge_seconds"] = round(seconds, 2)
            figures[f"s{n}_merge_peak_mb"] = round(peak / 2**20, 1)
            print(json.dumps({k: v for k, v in figures.items() if k.startswith(f"s{n}_")}), flush=True)
    n = min(args.shards)
    tracemalloc.start()
    seen = {f"{s:05d}{i:07d}key": f"shard-{s}" for s in range(n) for i in range(PER_SHARD)}
    figures[f"dict_of_keys_s{n}_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
    tracemalloc.stop()
    del seen
    print(json.dumps(figures, indent=1))
    harness.write_figures(figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
