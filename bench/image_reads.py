"""Detect's image reads over one 10k-image img2dataset tar, from local disk and from S3 (moto on loopback).

    python bench/image_reads.py                              # 10,000 rows, 64-row batches, local + S3
    python bench/image_reads.py --rows 2000 --no-s3 --out bench/out/image_reads.json

What is measured: reading only, no decoding, in one process pinned to one core. The shard is written the
way img2dataset writes it (`NNNNN.parquet` + `NNNNN.tar` with `<key>.jpg`, `<key>.txt`, `<key>.json` per
row; `grit_pipeline.assets.synthetic`, JPEGs sized so the tar is about the 137 MiB of a real 10k-image shard),
ingested by the real ingest stage (which records each member's offset and size), then read in 64-row
batches in source order with `stages.image_reader.read_images`, exactly as detect's `prepare_batch` does.

Bytes are counted where they are served: locally as the process's `rchar` (/proc/self/io: bytes returned
by read syscalls, page cache included), on S3 as the bytes the moto server sends back through a counting
TCP proxy on loopback (HTTP headers included). Local figures are with the tar in the page cache (it was
just written). The old reader (commit 6771668, `git show 6771668:stages/images.py`: the tar opened and
`tar.getmembers()` called for every batch) is timed on `--old-batches` batches and extrapolated to the
whole shard; its figures say so. Ingest's own one listing of the tar is reported apart.

Targets (the issue): bytes fetched <= 1.2 x the tar's size; local >= 2,000 images/s on one core.
No timing is asserted anywhere.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import types
from pathlib import Path

import harness  # first: this checkout on sys.path, the offline environment
import pyarrow as pa

from grit_pipeline.assets.synthetic import write_img2dataset
from stages.image_reader import locations_of, read_images
from stages.image_refs import ImageAllowList
from stages.images import ImageFailure
from stages.ingest import IngestConfig, IngestStage

OLD_COMMIT = "6771668"
BUCKET = "grit-bench"
MiB = 2**20
ANYWHERE = ImageAllowList(anywhere=True)  # the bench's own files, local and on its moto S3


def rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def ingest(uri: str) -> pa.Table:
    stage = IngestStage(IngestConfig(format="img2dataset"))
    result = stage.process_batch(stage.read(stage.discover(uri)[0]))
    assert result.rejects.num_rows == 0, result.rejects.to_pylist()[:3]
    return result.output


def batches(table: pa.Table, rows: int) -> list[pa.Table]:
    return [table.slice(i, rows) for i in range(0, table.num_rows, rows)]


def read_all(parts: list[pa.Table], count_bytes) -> dict:
    """Read every batch with the ranged reader; seconds (wall and CPU), images, bytes served."""
    before, wall, cpu = count_bytes(), time.perf_counter(), time.process_time()
    images = 0
    for part in parts:
        for blob in read_images(locations_of(part), allowed=ANYWHERE):
            assert not isinstance(blob, ImageFailure), blob
            images += 1
    return {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu, "images": images,
            "bytes": count_bytes() - before}


def old_reader(folder: Path) -> types.ModuleType | None:
    """`stages/images.py` as of the commit before ranged reads (written to `folder` and imported), or None
    outside a git checkout."""
    try:
        source = subprocess.run(["git", "show", f"{OLD_COMMIT}:stages/images.py"], cwd=harness.REPO, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = folder / "old_images.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_images", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def read_old(old: types.ModuleType, parts: list[pa.Table], n: int, count_bytes) -> dict:
    """The old whole-tar reader on the first `n` batches, extrapolated to all of them."""
    measured = parts[:n]
    before, wall = count_bytes(), time.perf_counter()
    for part in measured:
        for blob in old.read_image_refs(part["image_ref"].to_pylist()):
            assert not isinstance(blob, old.ImageFailure), blob
    seconds, fetched = time.perf_counter() - wall, count_bytes() - before
    images = sum(p.num_rows for p in measured)
    scale = sum(p.num_rows for p in parts) / images
    return {"batches_measured": len(measured), "seconds_per_batch": seconds / len(measured),
            "images_per_s": images / seconds, "bytes_per_batch": fetched / len(measured),
            "bytes_extrapolated": fetched * scale, "seconds_extrapolated": seconds * scale}


# --- S3: moto server behind a counting proxy -----------------------------------------------------------


class CountingProxy:
    """A TCP proxy on 127.0.0.1 in front of the S3 server, counting the bytes the server sends back."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.served = 0
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        server = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._handle, "127.0.0.1", 0),
                                                  self.loop).result()
        self.port = server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: bool) -> None:
            try:
                while data := await src.read(1 << 16):
                    if count:
                        self.served += len(data)
                    dst.write(data)
                    await dst.drain()
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True), return_exceptions=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)


def bench_s3(root: Path, batch_rows: int, old, old_batches: int) -> dict:
    import fsspec

    proc, moto_port = start_moto()
    try:
        proxy = CountingProxy(moto_port)
        endpoint = f"http://127.0.0.1:{proxy.port}"
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                           "FSSPEC_S3_ENDPOINT_URL": endpoint}.items():
            os.environ[key] = value
        fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
        fs = fsspec.filesystem("s3")
        fs.mkdir(BUCKET)
        for path in root.iterdir():
            fs.put_file(str(path), f"{BUCKET}/i2d/{path.name}")

        def served() -> int:
            return proxy.served

        before = served()
        table = ingest(f"s3://{BUCKET}/i2d")
        out = {"s3_ingest_bytes": served() - before}
        parts = batches(table, batch_rows)
        new = read_all(parts, served)
        out.update({"s3_read_seconds": new["seconds"], "s3_images_per_s": new["images"] / new["seconds"],
                    "s3_bytes_fetched": new["bytes"]})
        if old is not None and old_batches:
            out.update({f"s3_old_{k}": v for k, v in read_old(old, parts, old_batches, served).items()})
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--rows", type=int, default=10_000, help="images in the shard")
    ap.add_argument("--batch-rows", type=int, default=64, help="rows per prepare batch")
    ap.add_argument("--image-size", type=int, nargs=2, default=(768, 576), help="JPEG width height")
    ap.add_argument("--old-batches", type=int, default=3, help="batches of the old reader to time (0: skip)")
    ap.add_argument("--no-s3", action="store_true", help="local disk only")
    args = ap.parse_args()

    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})  # one core, as a prepare task gets
    results: dict[str, float | int | str] = {"rows": args.rows, "batch_rows": args.batch_rows, "core": core}
    with tempfile.TemporaryDirectory() as tmp:
        old = old_reader(Path(tmp)) if args.old_batches else None
        source = write_img2dataset(Path(tmp) / "i2d", shards=1, rows_per_shard=args.rows, bad_rows=False,
                                   distinct_images=64, image_size=tuple(args.image_size))
        tar_bytes = (source.root / "00000.tar").stat().st_size
        results["tar_bytes"] = tar_bytes
        with tarfile.open(source.root / "00000.tar") as tar:
            results["tar_members"] = len(tar.getmembers())

        before = rchar()
        table = ingest(str(source.root))
        results["local_ingest_bytes"] = rchar() - before
        parts = batches(table, args.batch_rows)
        results["batches"] = len(parts)
        read_all(parts[:2], rchar)  # warm imports and the filesystem instance
        new = read_all(parts, rchar)
        results.update({"local_read_seconds": new["seconds"], "local_read_cpu_seconds": new["cpu_seconds"],
                        "local_images_per_s": new["images"] / new["seconds"],
                        "local_images_per_cpu_s": new["images"] / new["cpu_seconds"],
                        "local_bytes_read": new["bytes"]})
        if old is not None:
            results.update({f"local_old_{k}": v for k, v in read_old(old, parts, args.old_batches, rchar).items()})
        if not args.no_s3:
            results.update(bench_s3(source.root, args.batch_rows, old, min(args.old_batches, 2)))

    for name in ("local_bytes_read", "local_old_bytes_extrapolated", "s3_bytes_fetched", "s3_old_bytes_extrapolated"):
        if name in results:
            results[f"{name}_over_tar"] = results[name] / tar_bytes
    for key, value in results.items():
        print(f"{key:40s} {value:,.4g}" if isinstance(value, float) else f"{key:40s} {value:,}")
    print(f"\ntar: {tar_bytes / MiB:.1f} MiB; local read {results['local_bytes_read'] / MiB:.1f} MiB "
          f"({results['local_bytes_read_over_tar']:.3f} x), {results['local_images_per_s']:,.0f} images/s on one core")
    if "s3_bytes_fetched" in results:
        print(f"S3 fetched {results['s3_bytes_fetched'] / MiB:.1f} MiB ({results['s3_bytes_fetched_over_tar']:.3f} x the tar)")
    harness.write_figures(results, args.out)


if __name__ == "__main__":
    main()
