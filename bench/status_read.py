"""What `grit status` costs on a large run, in both layouts of a run directory:

- `ledgers` (this engine): each stage's ledger as the driver's bookkeeping writes it (segments of 1,000
  commit records, each sealed one folded into `summary.json`), `progress.json` and the publish ledger. The
  `_done` markers are not written here: status never reads them, and the request counts show it.
- `markers` (the run directories of earlier versions, before ledgers): N x 5 `_done` markers, which
  status lists and reads one by one.

Each is read cold (`run_status`) and again by the same `StatusReader` (a `--watch` refresh) on a local disk
and on S3 (moto's server on loopback; S3 requests counted at botocore's `before-send`, timings are
moto's, not AWS's).

    python bench/status_read.py                                  # 5,000 shards, both layouts; 100,000 with ledgers
    python bench/status_read.py --shards 1000 --ledger-shards 10000 --out bench/out/status_read.json
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness  # first: this checkout on sys.path, the offline environment
import yaml

from grit_pipeline.commands.status import StatusReader
from grit_pipeline.engine.publish import PUBLISH, PublishFold
from grit_pipeline.rundir.ledger import LedgerWriter, ledger_folder
from grit_pipeline.rundir.progress import write_progress
from grit_pipeline.rundir.store import RunDir, json_bytes

STAGES = ("ingest", "chunks", "detect", "select", "compose")
FPS = {s: f"{i:016x}" for i, s in enumerate(STAGES)}


def _marker(stage: str, shard: int) -> dict:
    return {"stage": stage, "fingerprint": FPS[stage], "shard": shard, "rows_in": 10_000, "rows": 9_000,
            "rejects": 1_000, "reject_reasons": {"no_box": 1_000},
            "files": {f"shard-{shard:05d}.parquet": {"size": 1 << 20, "sha256": "0" * 64}}}


def write_run(rundir: RunDir, shards: int, layout: str) -> None:
    if layout == "markers":  # earlier versions: run.yaml listed every shard
        planned: object = list(range(shards))
    else:
        planned = f"0-{shards - 1}"
    rundir.write_text("run.yaml", yaml.safe_dump({"fingerprints": FPS, "planned_shards": planned, "layout": 2},
                                                 sort_keys=False))
    if layout == "ledgers":
        now = time.time()
        positions = {}
        for stage, fp in FPS.items():
            writer = LedgerWriter(rundir, ledger_folder(stage, fp))
            writer.append({k: v for k, v in _marker(stage, shard).items() if k not in ("stage", "fingerprint")}
                          | {"counters": {}, "seconds": 1.0, "peak_rss_mb": 900.0, "time": now - 1.0}
                          for shard in range(shards))
            writer.flush()
            positions[stage] = list(writer.position)
        publish = LedgerWriter(rundir, PUBLISH, PublishFold)
        publish.append({"shard": shard, "fp": FPS["compose"], "rows_in": 9_000, "rows_out": 9_000, "duplicates": 0,
                        "compose_sha256": "0" * 64, "basis": "0" * 64} for shard in range(shards))
        publish.flush()
        write_progress(rundir, {"written": now, "run_start": "2026-12-05T00:00:00Z", "state": "finished",
                                "planned": f"0-{shards - 1}",
                                "stages": {s: {"fingerprint": FPS[s], "ledger": positions[s]} for s in STAGES}})
        return
    blobs = {rundir.marker_path(stage, fp, shard): json_bytes(_marker(stage, shard))
             for stage, fp in FPS.items() for shard in range(shards)}
    if rundir.renames:
        for path, data in blobs.items():
            rundir.put_atomic(path, data)
    else:
        rundir.fs.pipe(blobs)  # concurrent PUTs


def measure(rundir: RunDir, count, shards: int) -> dict[str, float]:
    reader = StatusReader(rundir)
    before = count()
    t0 = time.perf_counter()
    status = reader.read()
    cold = time.perf_counter() - t0
    mid = count()
    t0 = time.perf_counter()
    reader.read()
    warm = time.perf_counter() - t0
    after = count()
    assert status["planned_shards"] == shards and all(s["committed"] == shards for s in status["stages"])
    return {"cold_seconds": round(cold, 3), "refresh_seconds": round(warm, 3),
            "cold_requests": mid - before, "refresh_requests": after - mid}


def _moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--shards", type=int, default=5000, help="shards of the run in both layouts")
    ap.add_argument("--ledger-shards", type=int, default=100_000, help="shards of a larger run, ledgers only")
    ap.add_argument("--no-s3", action="store_true", help="local disk only")
    args = ap.parse_args()
    figures: dict[str, float] = {"shards": args.shards, "ledger_shards": args.ledger_shards, "stages": len(STAGES)}
    cases = [("ledgers", args.shards), ("markers", args.shards), ("ledgers", args.ledger_shards)]

    for layout, n in cases:
        with tempfile.TemporaryDirectory() as tmp:
            rundir = RunDir(os.path.join(tmp, "run"))
            write_run(rundir, n, layout)
            local = measure(rundir, lambda: 0, n)
            figures.update({f"local_{layout}_{n}_{k}": v for k, v in local.items() if "requests" not in k})
            print(f"local, {layout}, {n:,} shards: cold {local['cold_seconds']} s, refresh {local['refresh_seconds']} s",
                  flush=True)

    if not args.no_s3:
        import s3fs

        proc, endpoint = _moto()
        try:
            options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint}}
            fs = s3fs.S3FileSystem(**options)
            for i, (layout, n) in enumerate(cases):
                fs.mkdir(f"grit-bench-{i}")
                rundir = RunDir(f"s3://grit-bench-{i}/run", options)
                write_run(rundir, n, layout)
                sent = [0]
                rundir.fs.connect()
                rundir.fs.s3.meta.events.register("before-send.s3", lambda sent=sent, **kw: sent.__setitem__(0, sent[0] + 1))
                s3 = measure(rundir, lambda sent=sent: sent[0], n)
                figures.update({f"s3_{layout}_{n}_{k}": v for k, v in s3.items()})
                print(f"s3 (moto), {layout}, {n:,} shards: cold {s3['cold_seconds']} s in {s3['cold_requests']} "
                      f"requests, refresh {s3['refresh_seconds']} s in {s3['refresh_requests']} requests", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    harness.print_figures(figures)
    harness.write_figures(figures, args.out)


if __name__ == "__main__":
    main()
