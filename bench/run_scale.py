"""What the run machinery costs per shard as a run grows (issue 18): the real driver (plan, scheduler,
bookkeeping, publisher, summary, dataset card), `grit status` and a re-run of a finished run, against S3
served by moto on loopback, with every request counted.

**Instant stages.** This machine cannot run 100,000 real shards, so the stage work is replaced by five
stages named and shaped as the pipeline's: `ingest` (a source of N virtual shards that needs no input
files), `chunks` (an actor pool), `detect` (an actor pool with a prepare step in CPU tasks, as the real
detect), `select` and `compose` (tasks), each returning its few rows at once. Everything else is the real
engine: workers write each stage's output, rejects and stats per shard to S3, the driver's bookkeeping
thread writes the `_done` markers, ledgers and progress.json, the publisher writes final shards, publish
records and key files; status, summary and the re-run read what they read for a real run. So the figures
are the machinery's cost with the stage compute taken out.

**Requests** are counted by the S3 server itself: moto's WSGI app wrapped by a counter, in its own process
(so the driver's CPU figure is the driver's alone), asked for its totals between phases. Each size runs in
a fresh child process (its peak RSS is its own); the publisher actor's peak RSS is sampled from the Ray
worker process that hosts it.

**A finished run of 100,000 shards** cannot be made here by running it (at this machine's pace, about
two requests a second per shard through moto, that is days), so `--finished N` writes the files such a
run leaves for status and a re-run to read -- every stage's `_done` markers and ledger, the publish
ledger, `grit/`, run.yaml, progress.json -- by copying a real one-shard run's files per shard (`finished_layout`), then
measures `grit status` (cold, refresh) and a re-run of the finished run with the real engine, on local
disk and on S3.

**Listings.** moto answers each page of a listing by scanning every key of the bucket (about 2.5 s a page
in a bucket of 700,000 objects), which AWS does not: there a page costs the same whatever the bucket
holds. By default (`--listing indexed`) the server answers ListObjectsV2 pages from a sorted index of the
bucket's key names (`bench/moto_listing.py`; the same pages as moto's own, checked by
`tests/test_bench_scripts.py`), so S3 seconds are the engine's and the protocol's, not moto's scan;
`--listing moto` keeps moto's own listing. Request counts are the same either way.

    python bench/run_scale.py --shards 1000 3000 --finished 100000    # 2 rows per shard (about 2 h here)
    python bench/run_scale.py --shards 200 --finished 5000 --out /tmp/run_scale_small.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import harness  # noqa: F401 - before any project import: this checkout on sys.path, offline environment
import pyarrow as pa  # noqa: E402

from stages.base import ActorExecution, PreparedExecution, Stage, StageConfig, StageResult  # noqa: E402

SERVER = r"""
import json, sys, threading
from collections import Counter
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

app = DomainDispatcherApplication(create_backend_app)
indexed = sys.argv[2] == "indexed"
if indexed:  # pages of ListObjectsV2 from a sorted index, as AWS answers them (bench/moto_listing.py)
    sys.path.insert(0, sys.argv[3])
    import moto_listing
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    moto_listing.install(s3_backends[DEFAULT_ACCOUNT_ID]["aws"])
lock = threading.Lock()
counts = Counter()

def load_folder(bucket, root):
    # setup, not measured: every file under `root` becomes an object of `bucket` (moto's backend directly)
    import os
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    n = 0
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                backend.put_object(bucket, os.path.relpath(path, root), f.read())
            n += 1
    return n

def counted(environ, start_response):
    if environ.get("PATH_INFO") == "/__load":
        from urllib.parse import parse_qs
        q = parse_qs(environ.get("QUERY_STRING", ""))
        body = str(load_folder(q["bucket"][0], q["root"][0])).encode()
        if indexed:
            moto_listing.touch()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    if environ.get("PATH_INFO") == "/__count":
        with lock:
            body = json.dumps(dict(counts)).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    path = environ.get("PATH_INFO", "")
    kind = "other"
    for part in ("/_done/", "/_ledger/", "progress.json", "/publish/", "/grit/", "/failures", "lease.json",
                 "run.yaml", "/logs/", "/stages/", "/report/"):
        if part in path:
            kind = part.strip("/")
            break
    if indexed and environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
        moto_listing.touch()  # the bucket may change: the next listing rebuilds its index
    with lock:
        counts["total"] += 1
        counts[environ.get("REQUEST_METHOD", "?")] += 1
        counts["path:" + kind] += 1
        counts[environ.get("REQUEST_METHOD", "?") + ":" + kind] += 1
    return app(environ, start_response)

run_simple("127.0.0.1", int(sys.argv[1]), counted, threaded=True)
"""


# --- the instant stages --------------------------------------------------------------------------------
class NoConfig(StageConfig):
    pass


@dataclass(frozen=True)
class VirtualShard:
    index: int
    uri: str
    rows: int


KEY = pa.field("key", pa.string(), nullable=False)


class InstantIngest(Stage[NoConfig]):
    name: ClassVar[str] = "ingest"
    version: ClassVar[int] = 1
    Config = NoConfig
    output_schema: ClassVar[pa.Schema] = pa.schema([KEY, pa.field("caption", pa.string())])

    def discover(self, uri: str) -> list[VirtualShard]:
        shards, rows = uri.removeprefix("scale://").split("/")
        return [VirtualShard(i, f"{uri}#{i}", int(rows)) for i in range(int(shards))]

    def read(self, shard: VirtualShard) -> pa.Table:
        keys = [f"{shard.index:06d}-{i}" for i in range(shard.rows)]
        return pa.table({"key": keys, "caption": [f"a photo of thing {k}" for k in keys]})

    def process_batch(self, table: pa.Table) -> StageResult:
        return StageResult(table, self.rejects().table())


def _column(stage: Stage, table: pa.Table, name: str, values: list) -> StageResult:
    return StageResult(pa.table({"key": table["key"], name: values}), stage.rejects().table())


class InstantChunks(Stage[NoConfig]):
    name: ClassVar[str] = "chunks"
    version: ClassVar[int] = 1
    Config = NoConfig
    Execution = ActorExecution
    output_schema: ClassVar[pa.Schema] = pa.schema([KEY, pa.field("chunks", pa.int64())])

    def process_batch(self, table: pa.Table) -> StageResult:
        return _column(self, table, "chunks", [1] * table.num_rows)


class InstantDetect(Stage[NoConfig]):
    name: ClassVar[str] = "detect"
    version: ClassVar[int] = 1
    Config = NoConfig
    Execution = PreparedExecution
    output_schema: ClassVar[pa.Schema] = pa.schema([KEY, pa.field("score", pa.float64())])

    def prepare_batch(self, table: pa.Table) -> StageResult:
        return StageResult(table, self.rejects().table())

    def process_batch(self, table: pa.Table) -> StageResult:
        return _column(self, table, "score", [0.9] * table.num_rows)


class InstantSelect(Stage[NoConfig]):
    name: ClassVar[str] = "select"
    version: ClassVar[int] = 1
    Config = NoConfig
    output_schema: ClassVar[pa.Schema] = pa.schema([KEY, pa.field("kept", pa.int64())])

    def process_batch(self, table: pa.Table) -> StageResult:
        return _column(self, table, "kept", [1] * table.num_rows)


class InstantCompose(Stage[NoConfig]):
    name: ClassVar[str] = "compose"
    version: ClassVar[int] = 1
    Config = NoConfig
    output_schema: ClassVar[pa.Schema] = pa.schema([KEY, pa.field("grounded_caption", pa.string())])

    def process_batch(self, table: pa.Table) -> StageResult:
        return _column(self, table, "grounded_caption", [f"<grounding>{c}" for c in table["caption"].to_pylist()])


STAGES = {s.name: s for s in (InstantIngest, InstantChunks, InstantDetect, InstantSelect, InstantCompose)}


# --- one size, in a child process --------------------------------------------------------------------------
def _counts(endpoint: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{endpoint}/__count") as r:  # noqa: S310 - loopback
        return json.loads(r.read())


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in sorted(after.items()) if v - before.get(k, 0)}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class PeakSampler:
    """Peak RSS (VmHWM) of the Ray worker process hosting the publisher actor, read from /proc every 0.5 s."""

    def __init__(self) -> None:
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    if b"ray::Publisher" not in (proc / "cmdline").read_bytes():
                        continue
                    for line in (proc / "status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak_kb = max(self.peak_kb, int(line.split()[1]))
                except OSError:
                    continue

    def stop(self) -> int:
        """The peak, in bytes."""
        self._stop.set()
        self._thread.join()
        return self.peak_kb * 1024


def measure_one(shards: int, rows: int, endpoint: str) -> dict:
    import s3fs

    from grit_pipeline.commands.status import StatusReader
    from grit_pipeline.engine import scheduler as scheduler_mod
    from grit_pipeline.engine.plan import build_plan, config_for
    from grit_pipeline.engine.runner import execute
    from grit_pipeline.rundir.store import RunDir

    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
    bucket = f"scale-{shards}-{os.getpid()}"
    s3fs.S3FileSystem(**options).mkdir(bucket)
    output = f"s3://{bucket}/run"
    config = config_for(STAGES, run={"progress": False, "storage_options": options, "num_cpus": 2,
                                     "resources": {"detect": {"batch_size": 64}, "chunks": {"batch_size": 64}}})
    uri = f"scale://{shards}/{rows}"

    loop_end: dict[str, float | dict] = {}
    real_run = scheduler_mod.Scheduler.run

    def run_and_mark(self):  # the end of the scheduling loop: what comes after it is the end of the run
        try:
            real_run(self)
        finally:
            loop_end.update(time=time.perf_counter(), counts=_counts(endpoint))

    scheduler_mod.Scheduler.run = run_and_mark
    out: dict = {"shards": shards, "rows_per_shard": rows}

    c0, t0, cpu0 = _counts(endpoint), time.perf_counter(), _cpu()
    sampler = PeakSampler()
    plan = build_plan(config, input_uri=uri, output_uri=output, stage_classes=STAGES)
    result = execute(plan, progress=False, command="bench/run_scale.py")
    publisher_rss = sampler.stop()
    t1, cpu1, c1 = time.perf_counter(), _cpu(), _counts(endpoint)
    assert result.ok, result.failures[:3]
    assert len(result.final_shards) == shards
    run_req = _delta(c1, c0)
    out["run"] = {"seconds": round(t1 - t0, 1), "driver_cpu_s": round(cpu1 - cpu0, 2),
                  "driver_cpu_ms_per_shard": round((cpu1 - cpu0) / shards * 1000, 3),
                  "requests": run_req.get("total", 0), "requests_per_shard": round(run_req.get("total", 0) / shards, 2),
                  "by_kind": run_req,
                  "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "publisher_peak_rss_mb": round(publisher_rss / 2**20, 1)}
    end_req = _delta(c1, loop_end["counts"])  # type: ignore[arg-type]
    out["end_of_run"] = {"seconds": round(t1 - float(loop_end["time"]), 2), "requests": end_req.get("total", 0),
                         "by_kind": end_req}

    rundir = RunDir(output, options)
    reader = StatusReader(rundir)
    c0, t0 = _counts(endpoint), time.perf_counter()
    status = reader.read()
    t1, c1 = time.perf_counter(), _counts(endpoint)
    assert all(s["committed"] == shards for s in status["stages"]), status["stages"]
    assert status["final_shards"] == shards
    out["status_cold"] = {"seconds": round(t1 - t0, 2), "requests": _delta(c1, c0).get("total", 0),
                          "by_kind": _delta(c1, c0)}
    c0, t0 = c1, time.perf_counter()
    reader.read()
    t1, c1 = time.perf_counter(), _counts(endpoint)
    out["status_refresh"] = {"seconds": round(t1 - t0, 2), "requests": _delta(c1, c0).get("total", 0),
                             "by_kind": _delta(c1, c0)}

    c0, t0 = _counts(endpoint), time.perf_counter()
    plan = build_plan(config, input_uri=uri, output_uri=output, stage_classes=STAGES)
    again = execute(plan, progress=False, command="bench/run_scale.py (again)")
    t1, c1 = time.perf_counter(), _counts(endpoint)
    assert again.ok and all(not s.computed for s in again.stages)
    out["rerun_finished"] = {"seconds": round(t1 - t0, 1), "requests": _delta(c1, c0).get("total", 0),
                             "by_kind": _delta(c1, c0)}
    return out


# --- a finished run of many shards, made from a real one-shard run -------------------------------------------
def finished_layout(config: dict, shards: int, rows: int, base_dir: Path, big_dir: Path) -> int:
    """Write, under `big_dir`, what a finished run of `shards` instant shards leaves for `grit status` and a
    re-run to read: every stage's `_done` markers and ledger, the publish ledger, `grit/`, run.yaml and
    progress.json (state `finished`, each ledger's position: what a clean finish leaves).

    The shard files come from a real run of one shard (`base_dir`, the real engine), copied per shard with
    the shard's number in them (markers, the publish ledger's basis chain, which `next_basis` recomputes,
    final shards). Ledgers are written by the project's `LedgerWriter` from `commit_record`s, as the
    bookkeeping writes them. Stage outputs, stats and key files are not copied: neither status nor a re-run
    of a finished run reads them. Returns the number of files written."""
    import shutil as _shutil

    import yaml

    from grit_pipeline.engine.bookkeeping import commit_record
    from grit_pipeline.engine.plan import build_plan
    from grit_pipeline.engine.publish import GENESIS, PUBLISH, PublishFold, next_basis
    from grit_pipeline.engine.runner import execute
    from grit_pipeline.rundir.ledger import LedgerWriter, ledger_folder, read_segment
    from grit_pipeline.rundir.progress import read_progress, write_progress
    from grit_pipeline.rundir.store import RunDir, json_bytes, shard_name

    base = execute(build_plan(config, input_uri=f"scale://1/{rows}", output_uri=str(base_dir), stage_classes=STAGES),
                   progress=False, command="bench/run_scale.py (one shard)")
    assert base.ok and base.final_shards == [0], base.failures
    src = RunDir(str(base_dir))
    plan = build_plan(config, input_uri=f"scale://{shards}/{rows}", output_uri=str(big_dir), stage_classes=STAGES)
    big, now, written = plan.rundir, time.time(), 0
    positions: dict[str, list[int]] = {}

    def rename(value, shard: int):  # shard 0's names and number -> `shard`'s
        if isinstance(value, dict):
            return {rename(k, shard): rename(v, shard) for k, v in value.items()}
        if isinstance(value, str):
            return value.replace(shard_name(0), shard_name(shard))
        return value

    for stage in plan.stages:
        src_fp = next(f for f in os.listdir(base_dir / "stages" / stage.name) if not f.startswith("_"))
        marker0 = src.markers(stage.name, src_fp, [0])[0] | {"fingerprint": stage.fingerprint}
        stats0 = src.read_stats(stage.name, src_fp, [0])[0]
        done = Path(big.marker_path(stage.name, stage.fingerprint, 0)).parent
        done.mkdir(parents=True, exist_ok=True)
        records = []
        for shard in range(shards):
            marker = rename(marker0, shard) | {"shard": shard}
            (done / shard_name(shard)).write_bytes(json_bytes(marker))
            records.append(commit_record(marker, stats0, now))
        writer = LedgerWriter(big, ledger_folder(stage.name, stage.fingerprint))
        writer.append(records)
        writer.flush()
        positions[stage.name] = list(writer.position)
        written += shards
    compose = plan.stages[-1]
    record0 = read_segment(src, PUBLISH, 0)[0]
    sha = marker0["files"][f"{shard_name(0)}.parquet"]["sha256"]  # the last stage's: compose
    basis, records = GENESIS, []
    for shard in range(shards):
        records.append(record0 | {"shard": shard, "fp": compose.fingerprint, "compose_sha256": sha, "basis": basis})
        basis = next_basis(basis, shard, sha)
    writer = LedgerWriter(big, PUBLISH, PublishFold)
    writer.append(records)
    writer.flush()
    final0 = Path(src.final_path(0))
    Path(big.final_path(0)).parent.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        _shutil.copyfile(final0, big.final_path(shard))
    run_yaml = yaml.safe_load((base_dir / "run.yaml").read_text()) | {"fingerprints": plan.fingerprints,
                                                                      "planned_shards": f"0-{shards - 1}"}
    big.write_text("run.yaml", yaml.safe_dump(run_yaml, sort_keys=False))
    progress = read_progress(src) | {"planned": f"0-{shards - 1}", "published": shards, "failures": 0,
                                     "stages": {s.name: {"fingerprint": s.fingerprint, "inflight": "",
                                                         "ledger": positions[s.name]} for s in plan.stages}}
    assert progress["state"] == "finished", progress
    write_progress(big, progress)  # as the run's bookkeeping leaves it at a clean finish
    return written + 2 * shards + 1


def _reset_peak_rss() -> None:
    """Start this process's peak RSS (VmHWM) afresh (Linux), so a phase's peak is its own."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def measure_finished(shards: int, rows: int, endpoint: str, workdir: str | None, where: list[str]) -> dict:
    """`grit status` (cold, refresh) and a re-run of a finished run of `shards` shards (`finished_layout`),
    on local disk and on S3 (moto): seconds, requests, the re-run's driver CPU and peak RSS."""
    import tempfile

    import s3fs

    from grit_pipeline.commands.status import StatusReader
    from grit_pipeline.engine.plan import build_plan, config_for
    from grit_pipeline.engine.runner import execute
    from grit_pipeline.rundir.store import RunDir

    out: dict = {"shards": shards, "rows_per_shard": rows}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        local = config_for(STAGES, run={"progress": False, "num_cpus": 2})
        t0 = time.perf_counter()
        files = finished_layout(local, shards, rows, Path(tmp) / "one", Path(tmp) / "big")
        out["layout"] = {"files": files, "seconds": round(time.perf_counter() - t0, 1)}

        def phases(output: str, config: dict, options: dict | None, counted: bool) -> dict:
            res: dict = {}
            reader = StatusReader(RunDir(output, options))
            for phase in ("status_cold", "status_refresh"):
                c0, t0 = _counts(endpoint) if counted else {}, time.perf_counter()
                status = reader.read()
                res[phase] = {"seconds": round(time.perf_counter() - t0, 2)}
                if counted:
                    res[phase]["requests"] = _delta(_counts(endpoint), c0).get("total", 0)
                assert all(s["committed"] == shards for s in status["stages"]), status["stages"]
                assert status["final_shards"] == shards
            c0, t0, cpu0 = _counts(endpoint) if counted else {}, time.perf_counter(), _cpu()
            _reset_peak_rss()
            again = execute(build_plan(config, input_uri=f"scale://{shards}/{rows}", output_uri=output,
                                       stage_classes=STAGES), progress=False, command="bench/run_scale.py (again)")
            res["rerun_finished"] = {"seconds": round(time.perf_counter() - t0, 1),
                                     "driver_cpu_s": round(_cpu() - cpu0, 2), "driver_peak_rss_mb": _peak_rss_mb()}
            if counted:
                delta = _delta(_counts(endpoint), c0)
                res["rerun_finished"] |= {"requests": delta.get("total", 0), "by_kind": delta}
            assert again.ok and all(not s.computed for s in again.stages), again.stages
            assert len(again.final_shards) == shards
            return res

        if "local" in where:
            out["local"] = phases(str(Path(tmp) / "big"), local, None, False)
        if "s3" not in where:
            return out
        options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
        bucket = f"finished-{shards}-{os.getpid()}"
        s3fs.S3FileSystem(**options).mkdir(bucket)
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"{endpoint}/__load?bucket={bucket}&root={Path(tmp) / 'big'}",  # noqa: S310
                                    timeout=3600) as r:
            out["layout"]["s3_objects"] = int(r.read())
        out["layout"]["s3_load_seconds"] = round(time.perf_counter() - t0, 1)
        s3 = config_for(STAGES, run={"progress": False, "num_cpus": 2, "storage_options": options})
        out["s3"] = phases(f"s3://{bucket}", s3, options, True)
    return out


# --- the parent: a counting S3 server, one child per size ---------------------------------------------------
def start_server(listing: str = "indexed") -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port), listing, str(Path(__file__).resolve().parent)],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            _counts(endpoint)
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the counting S3 server did not start")


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--shards", type=int, nargs="+", default=[1000, 3000])
    ap.add_argument("--rows", type=int, default=2, help="rows per shard")
    ap.add_argument("--finished", type=int, nargs="*", default=[100_000],
                    help="also: status and a re-run of a finished run of this many shards (files copied from a "
                         "real one-shard run; see finished_layout)")
    ap.add_argument("--finished-where", nargs="+", choices=["local", "s3"], default=["local", "s3"],
                    help="where to measure the finished runs (S3 through moto takes long at 100k: see above)")
    ap.add_argument("--workdir", default=None, help="local folder for the finished runs' files")
    ap.add_argument("--listing", choices=["indexed", "moto"], default="indexed",
                    help="how the S3 server answers listings: from a sorted index as AWS does (default), or "
                         "moto's own scan of the whole bucket per page")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child: one size
    ap.add_argument("--one-finished", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(measure_one(args.one, args.rows, args.endpoint)))
        return
    if args.one_finished is not None:
        print(json.dumps(measure_finished(args.one_finished, args.rows, args.endpoint, args.workdir,
                                          args.finished_where)))
        return

    proc, endpoint = start_server(args.listing)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL": endpoint,
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONHASHSEED": "0"}
    results, finished = [], []

    def child(flag: str, n: int) -> dict:
        t0 = time.perf_counter()
        extra = (["--workdir", args.workdir] if args.workdir else []) + ["--finished-where", *args.finished_where]
        done = subprocess.run([sys.executable, __file__, flag, str(n), "--rows", str(args.rows), "--endpoint",
                               endpoint, *extra], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-5000:])
            raise SystemExit(f"run_scale: {flag} {n} failed")
        res = json.loads(done.stdout.strip().splitlines()[-1])
        res["bench_seconds"] = round(time.perf_counter() - t0, 1)
        return res

    try:
        for n in args.shards:
            res = child("--one", n)
            results.append(res)
            r = res["run"]
            print(f"S={n:>7,}: run {r['seconds']:>8.1f} s, driver CPU {r['driver_cpu_ms_per_shard']:.2f} ms/shard, "
                  f"{r['requests_per_shard']:.1f} requests/shard, driver peak {r['driver_peak_rss_mb']:.0f} MB, "
                  f"publisher peak {r['publisher_peak_rss_mb']:.0f} MB | status cold "
                  f"{res['status_cold']['requests']} req {res['status_cold']['seconds']} s, refresh "
                  f"{res['status_refresh']['requests']} req {res['status_refresh']['seconds']} s | end of run "
                  f"{res['end_of_run']['requests']} req {res['end_of_run']['seconds']} s | re-run "
                  f"{res['rerun_finished']['requests']} req {res['rerun_finished']['seconds']} s", flush=True)
        for n in args.finished:
            res = child("--one-finished", n)
            finished.append(res)
            line = f"finished run of {n:,} shards ({res['layout']['files']:,} files copied from a one-shard run):"
            for where in ("local", "s3"):
                if where in res:
                    p = res[where]
                    line += (f" | {where}: status cold {p['status_cold'].get('requests', '-')} req "
                             f"{p['status_cold']['seconds']} s, refresh {p['status_refresh'].get('requests', '-')} req "
                             f"{p['status_refresh']['seconds']} s, re-run {p['rerun_finished'].get('requests', '-')} req "
                             f"{p['rerun_finished']['seconds']} s, driver CPU {p['rerun_finished']['driver_cpu_s']} s, "
                             f"peak {p['rerun_finished']['driver_peak_rss_mb']:.0f} MB")
            print(line, flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(f"per-shard driver CPU at {b['shards']:,} vs {a['shards']:,}: "
              f"{b['run']['driver_cpu_ms_per_shard']} / {a['run']['driver_cpu_ms_per_shard']} = "
              f"{b['run']['driver_cpu_ms_per_shard'] / a['run']['driver_cpu_ms_per_shard']:.2f}x; requests per shard: "
              f"{b['run']['requests_per_shard']} / {a['run']['requests_per_shard']} = "
              f"{b['run']['requests_per_shard'] / a['run']['requests_per_shard']:.2f}x")
    harness.write_figures({"listing": args.listing, **flat_figures(args.rows, results, finished)}, args.out)


def flat_figures(rows: int, results: list[dict], finished: list[dict]) -> dict:
    """One flat object for bench/RESULTS.md: `s<shards>_<phase>_<figure>` for whole runs,
    `finished<shards>_<local|s3>_<phase>_<figure>` for finished runs, request kinds left out, and the ratios
    the issue's targets are stated in (largest size over smallest)."""
    out: dict = {"rows_per_shard": rows}
    for res in finished:
        n = res["shards"]
        out[f"finished{n}_files"] = res["layout"]["files"]
        for where in ("local", "s3"):
            for phase, figures in res.get(where, {}).items():
                for name, value in figures.items():
                    if name != "by_kind":
                        out[f"finished{n}_{where}_{phase}_{name}"] = value
    for res in results:
        n = res["shards"]
        for phase in ("run", "status_cold", "status_refresh", "end_of_run", "rerun_finished"):
            for name, value in res[phase].items():
                if name != "by_kind":
                    out[f"s{n}_{phase}_{name}"] = value
    if len(results) > 1:
        a, b = results[0]["run"], results[-1]["run"]
        tag = f"s{results[-1]['shards']}_over_s{results[0]['shards']}"
        out[f"{tag}_driver_cpu_per_shard"] = round(b["driver_cpu_ms_per_shard"] / a["driver_cpu_ms_per_shard"], 3)
        out[f"{tag}_requests_per_shard"] = round(b["requests_per_shard"] / a["requests_per_shard"], 3)
    return out


if __name__ == "__main__":
    main()
