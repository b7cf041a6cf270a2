"""Cost of the image-reference check (`stages.image_refs.check_refs`) on a 10k-row shard, beside what ingest
does with the same shard anyway.

    python bench/image_refs.py                     # 10,000 rows
    python bench/image_refs.py --rows 2000 --out bench/out/image_refs.json

What is measured, the least process CPU time of `--repeat` runs, in one process:

- `s3`: check_refs over 10k `s3://my-images/part-NNN/<i>.jpg` references against an allow-list of two
  prefixes (string work only: object stores have no symlinks);
- `local`: check_refs over 10k local files in 100 folders inside the allowed input folder (adds one
  `lstat` per file and one `realpath` per folder);
- `ingest_read`: the parquet source's whole `read` of the same 10k local rows (Parquet read, the check,
  the existence listing of the 100 folders), which includes the `local` check once.

The ratio printed is check / ingest read: the share of ingest's read that the check costs. Nothing is
asserted anywhere.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import harness  # noqa: E402 - this checkout on sys.path, offline environment
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from stages.image_refs import ImageAllowList, check_refs  # noqa: E402
from stages.ingest import IngestConfig, IngestStage  # noqa: E402

FOLDERS = 100


def best(fn, repeat: int) -> float:
    """The least CPU time of the process over `repeat` calls (CPU, not wall: the figures stay usable on a
    machine shared with other work; the check and the listing here wait on no I/O beyond syscalls)."""
    times = []
    for _ in range(repeat):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return min(times)


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "in"
        rel = [f"images/{i % FOLDERS:03d}/{i:07d}.jpg" for i in range(args.rows)]
        for i in range(FOLDERS):
            (root / "images" / f"{i:03d}").mkdir(parents=True)
        for r in rel:
            (root / r).write_bytes(b"\xff\xd8")
        pq.write_table(pa.table({"caption": [f"a photo {i}" for i in range(args.rows)], "image_path": rel}),
                       root / "meta.parquet")

        allowed = ImageAllowList.of(["s3://my-images/", "/mnt/images/"]).with_roots(str(root))
        s3_refs = [f"s3://my-images/part-{i % FOLDERS:03d}/{i:07d}.jpg" for i in range(args.rows)]
        local_refs = [f"{root}/{r}" for r in rel]
        assert check_refs(s3_refs, allowed) == [None] * args.rows
        assert check_refs(local_refs, allowed) == [None] * args.rows

        stage = IngestStage(IngestConfig(format="parquet"))
        (shard,) = stage.discover(str(root))
        assert stage.read(shard)["image_ref"].null_count == 0

        s3 = best(lambda: check_refs(s3_refs, allowed), args.repeat)
        local = best(lambda: check_refs(local_refs, allowed), args.repeat)
        read = best(lambda: stage.read(shard), args.repeat)

    figures = {
        "rows": args.rows, "folders": FOLDERS, "repeat": args.repeat,
        "check_s3_ms": round(s3 * 1e3, 2), "check_s3_us_per_row": round(s3 * 1e6 / args.rows, 2),
        "check_local_ms": round(local * 1e3, 2), "check_local_us_per_row": round(local * 1e6 / args.rows, 2),
        "ingest_read_ms": round(read * 1e3, 2),
        "check_local_share_of_ingest_read": round(local / read, 3),
    }
    print(json.dumps(figures, indent=1))
    harness.write_figures(figures, args.out)


if __name__ == "__main__":
    main()
