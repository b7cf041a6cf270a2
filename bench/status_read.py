"""What `grit status` costs on a large run: a run directory of N shards x 5 stages of committed markers
(as the engine writes them), read cold (`run_status`) and again by the same `StatusReader` (a `--watch`
refresh, which reads only new markers), on a local disk and on S3 (moto's server on loopback; S3
requests counted at botocore's `before-send`, timings are moto's, not AWS's).

    python bench/status_read.py                                  # 5,000 shards, local and S3
    python bench/status_read.py --shards 1000 --out bench/out/status_read.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

from grit_pipeline.rundir import RunDir, json_bytes  # noqa: E402
from grit_pipeline.status import StatusReader  # noqa: E402

STAGES = ("ingest", "chunks", "detect", "select", "compose")


def write_run(rundir: RunDir, shards: int) -> None:
    fps = {s: f"{i:016x}" for i, s in enumerate(STAGES)}
    rundir.write_text("run.yaml", yaml.safe_dump({"fingerprints": fps, "planned_shards": list(range(shards)), "layout": 2}))
    blobs = {}
    for stage, fp in fps.items():
        for shard in range(shards):
            marker = {"stage": stage, "fingerprint": fp, "shard": shard, "rows_in": 10_000, "rows": 9_000,
                      "rejects": 1_000, "reject_reasons": {"no_box": 1_000},
                      "files": {"shard.parquet": {"size": 1 << 20, "sha256": "0" * 64}}}
            blobs[rundir.marker_path(stage, fp, shard)] = json_bytes(marker)
    if rundir.renames:
        for path, data in blobs.items():
            rundir.put_atomic(path, data)
    else:
        rundir.fs.pipe(blobs)  # concurrent PUTs


def measure(rundir: RunDir, count) -> dict[str, float]:
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
    assert all(s["committed"] == status["planned_shards"] for s in status["stages"])
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=5000)
    ap.add_argument("--no-s3", action="store_true", help="local disk only")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    figures: dict[str, float] = {"shards": args.shards, "stages": len(STAGES)}

    with tempfile.TemporaryDirectory() as tmp:
        rundir = RunDir(os.path.join(tmp, "run"))
        write_run(rundir, args.shards)
        local = measure(rundir, lambda: 0)
        figures.update({f"local_{k}": v for k, v in local.items() if "requests" not in k})
        print(f"local: cold {local['cold_seconds']} s, refresh {local['refresh_seconds']} s", flush=True)

    if not args.no_s3:
        import s3fs

        proc, endpoint = _moto()
        try:
            options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint}}
            fs = s3fs.S3FileSystem(**options)
            fs.mkdir("grit-bench")
            rundir = RunDir("s3://grit-bench/run", options)
            write_run(rundir, args.shards)
            sent = [0]
            rundir.fs.connect()
            rundir.fs.s3.meta.events.register("before-send.s3", lambda **kw: sent.__setitem__(0, sent[0] + 1))
            s3 = measure(rundir, lambda: sent[0])
            figures.update({f"s3_{k}": v for k, v in s3.items()})
            print(f"s3 (moto): cold {s3['cold_seconds']} s in {s3['cold_requests']} requests, refresh "
                  f"{s3['refresh_seconds']} s in {s3['refresh_requests']} requests", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    print(json.dumps(figures, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
