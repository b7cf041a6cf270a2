"""`grit download` against an HTTP server on 127.0.0.1: successes, failures with their status, and
`--retry-failed` re-fetching only the failed rows into their original shards and keys."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import io
import json
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from grit_pipeline.commands.download import (
    MANIFEST_NAME,
    DownloadError,
    DownloadOptions,
    download,
    register,
    resolve_columns,
    retry_failed,
    summarize,
)

TIMEOUT_S = 1  # img2dataset's per-request timeout in the tests; /slow/ answers after 3 s


def _jpeg(n: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64 + n, 48), (30 * n % 256, 90, 200)).save(buf, "JPEG")
    return buf.getvalue()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    flaky_ok = False
    requests: list[str]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self):  # noqa: N802 - http.server's name
        self.server.requests.append(self.path)
        kind, name = self.path.strip("/").split("/")
        n = int(name.split(".")[0])
        if kind == "missing":
            self.send_error(404)
            return
        if kind == "slow":
            time.sleep(3 * TIMEOUT_S)
        if kind == "flaky" and not self.server.flaky_ok:
            self.send_error(503)
            return
        body = _jpeg(n)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # a /slow/ url whose client already timed out

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.requests = []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


# Two shards of four rows: what each url does, in input order.
KINDS = ["ok", "missing", "ok", "flaky", "ok", "slow", "ok", "flaky"]


def _url_list(tmp_path: Path, srv: _Server) -> tuple[Path, pa.Table]:
    host, port = srv.server_address[:2]
    n = len(KINDS)
    table = pa.table({
        "url": [f"http://{host}:{port}/{k}/{i}.jpg" for i, k in enumerate(KINDS)],
        "caption": [f"picture number {i}" for i in range(n)],
        "id": pa.array([1000 + i for i in range(n)], pa.int64()),
        "clip_similarity_vitb32": [0.25 + i / 100 for i in range(n)],
        "noun_chunks": [[[0.0, 7.0, 0.1, 0.2, 0.3 + i / 100, 0.4, 0.9]] for i in range(n)],
        "ref_exps": [[[0.0, 14.0, 0.1, 0.2, 0.3 + i / 100, 0.4, 0.9]] for i in range(n)],
        "width": pa.array([640] * n, pa.int64()),  # GRIT-20M carries these; img2dataset writes its own
    })
    path = tmp_path / "urls.parquet"
    pq.write_table(table, path)
    return path, table


def _rows(out: Path) -> dict[str, dict]:
    """url -> metadata row over every shard, with the shard id it sits in."""
    rows = {}
    for pq_path in sorted(out.glob("[0-9]*.parquet")):
        for r in pq.read_table(pq_path).to_pylist():
            rows[r["url"]] = {**r, "_shard": pq_path.stem}
    return rows


def _tar(out: Path, shard: str) -> dict[str, bytes]:
    with tarfile.open(out / f"{shard}.tar") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def _options() -> DownloadOptions:
    return DownloadOptions(rows_per_shard=4, threads=8, timeout=TIMEOUT_S, image_size=64)


@pytest.mark.slow
def test_download_records_failures_and_retry_fetches_only_them(tmp_path, server):
    url_list, source = _url_list(tmp_path, server)
    out = tmp_path / "shards"
    summary = download(str(url_list), str(out), _options())

    assert summary.shards == ["00000", "00001"]
    assert (summary.rows, summary.successes) == (8, 4)
    assert summary.failures == {"failed_to_download": 4}
    assert (out / MANIFEST_NAME).exists()

    rows = _rows(out)
    by_kind = {k: [r for u, r in rows.items() if f"/{k}/" in u] for k in set(KINDS)}
    for r in by_kind["ok"]:
        assert r["status"] == "success" and r["width"] > 0 and r["error_message"] is None
    assert all("404" in r["error_message"] for r in by_kind["missing"])
    assert all("timed out" in r["error_message"].lower() for r in by_kind["slow"])
    assert all("503" in r["error_message"] for r in by_kind["flaky"])
    assert all(r["status"] == "failed_to_download" for k in ("missing", "slow", "flaky") for r in by_kind[k])
    # Passthrough columns travel with every row, failed ones included; `width` is img2dataset's own.
    for src in source.to_pylist():
        r = rows[src["url"]]
        for col in ("caption", "id", "clip_similarity_vitb32", "noun_chunks", "ref_exps"):
            assert r[col] == src[col], col
    # The tars hold exactly the successes: image, caption, metadata.
    for shard in ("00000", "00001"):
        members = _tar(out, shard)
        ok_keys = sorted(r["key"] for r in rows.values() if r["_shard"] == shard and r["status"] == "success")
        assert sorted({n.split(".")[0] for n in members}) == ok_keys
        for key in ok_keys:
            assert {f"{key}.jpg", f"{key}.txt", f"{key}.json"} <= set(members)
    before = rows
    before_tars = {s: _tar(out, s) for s in ("00000", "00001")}

    # The flaky urls come back; `grit download --retry-failed` asks the server only for the 4 failed urls.
    server.flaky_ok = True
    server.requests.clear()
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps typer from collapsing the app into `download`
        pass

    result = CliRunner().invoke(app, ["download", "--retry-failed", str(out), "--timeout", str(TIMEOUT_S)])
    assert result.exit_code == 0, result.output
    assert "retried 4 row(s), 2 now downloaded" in result.output
    failed_paths = sorted("/" + u.split("/", 3)[3] for u, r in before.items() if r["status"] != "success")
    assert sorted(server.requests) == failed_paths
    summary = summarize(str(out))
    assert (summary.successes, summary.failures) == (6, {"failed_to_download": 2})

    after = _rows(out)
    assert set(after) == set(before)
    for url, old in before.items():
        new = after[url]
        assert (new["key"], new["_shard"]) == (old["key"], old["_shard"])  # same key, same shard id
        if "/flaky/" in url:
            assert new["status"] == "success" and new["width"] > 0
            assert new["noun_chunks"] == old["noun_chunks"] and new["id"] == old["id"]
            members = _tar(out, new["_shard"])
            img = Image.open(io.BytesIO(members[f"{new['key']}.jpg"]))
            n = int(url.rsplit("/", 1)[1].split(".")[0])
            assert img.size == (new["width"], new["height"]) == (64 + n, 48)  # the served image, as recorded
            assert json.loads(members[f"{new['key']}.json"])["key"] == new["key"]
            assert members[f"{new['key']}.txt"].decode() == old["caption"]
        elif old["status"] == "success":
            assert new == old
        else:
            assert new["status"] == "failed_to_download"
            assert new["error_message"] == old["error_message"]
    # Images downloaded the first time are untouched; the tar has no scratch keys.
    for shard, old_members in before_tars.items():
        new_members = _tar(out, shard)
        assert {n: b for n, b in new_members.items() if n in old_members} == old_members
        ok_keys = sorted(r["key"] for r in after.values() if r["_shard"] == shard and r["status"] == "success")
        assert sorted({n.split(".")[0] for n in new_members}) == ok_keys
    stats = json.loads((out / "00000_stats.json").read_text())
    assert (stats["count"], stats["successes"], stats["failed_to_download"]) == (4, 3, 1)
    assert not (out / "_grit_retry").exists()
    assert not list(out.glob("*grit-retry-tmp"))


def test_columns_resolved_for_laion_and_coyo_lists(tmp_path):
    laion = tmp_path / "laion.parquet"
    pq.write_table(pa.table({"URL": ["u"], "TEXT": ["t"], "WIDTH": [1], "similarity": [0.3], "key": ["k"]}), laion)
    assert resolve_columns(str(laion), DownloadOptions()) == ("URL", "TEXT", ["WIDTH", "similarity"])
    coyo = tmp_path / "coyo.parquet"
    pq.write_table(pa.table({"id": [1], "url": ["u"], "text": ["t"], "clip_similarity_vitl14": [0.3]}), coyo)
    assert resolve_columns(str(coyo), DownloadOptions(keep_columns=["id"])) == ("url", "text", ["id"])


def test_unusable_url_lists_are_named_in_the_error(tmp_path):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"link": ["u"], "caption": ["t"]}), bad)
    with pytest.raises(DownloadError, match="bad.parquet: no url column"):
        resolve_columns(str(bad), DownloadOptions())
    with pytest.raises(DownloadError, match="written by img2dataset"):
        resolve_columns(str(bad), DownloadOptions(url_col="link", keep_columns=["caption"]))
    with pytest.raises(DownloadError, match="not found"):
        resolve_columns(str(tmp_path / "absent.parquet"), DownloadOptions())
    with pytest.raises(DownloadError, match="no img2dataset shards"):
        retry_failed(str(tmp_path))


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_merge_replaces_rows_in_place_and_repairs_a_half_merged_tar(tmp_path):
    """One shard's merge, without the network: retried rows take their original key and position, the
    tar ends up holding exactly the success rows (a stale member left by an interrupted merge is dropped
    and replaced), and the shard's stats follow the new statuses."""
    import fsspec

    from grit_pipeline.commands.download import RETRY_KEY_COL, RETRY_SHARD_COL, _merge_shard

    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("id", pa.int64()), ("key", pa.string()),
                        ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int32())])
    rows = [
        {"url": "u0", "caption": "c0", "id": 0, "key": "000000000", "status": "success", "error_message": None, "width": 5},
        {"url": "u1", "caption": "c1", "id": 1, "key": "000000001", "status": "failed_to_download",
         "error_message": "HTTP Error 503", "width": None},
        {"url": "u2", "caption": "c2", "id": 2, "key": "000000002", "status": "failed_to_download",
         "error_message": "HTTP Error 404", "width": None},
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "00000.parquet")
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in [("000000000.jpg", b"img0"), ("000000000.txt", b"c0"),
                           ("000000001.jpg", b"stale")]:  # left by an interrupted merge
            info, data = _member(name, data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 3, "successes": 1, "duration": 1.0}))

    retried = pa.Table.from_pylist([
        {**rows[1], "key": "scratch-0", "status": "success", "error_message": None, "width": 7,
         RETRY_KEY_COL: "000000001", RETRY_SHARD_COL: "00000"},
        {**rows[2], "key": "scratch-1", "error_message": "HTTP Error 410", RETRY_KEY_COL: "000000002",
         RETRY_SHARD_COL: "00000"},
    ])
    fetched = {"scratch-0": [_member("scratch-0.jpg", b"img1"), _member("scratch-0.txt", b"c1"),
                             _member("scratch-0.json", json.dumps({"key": "scratch-0", RETRY_KEY_COL: "x"}).encode())]}
    fs = fsspec.filesystem("file")
    assert _merge_shard(fs, str(tmp_path), "00000", retried, fetched) == 1

    merged = pq.read_table(tmp_path / "00000.parquet")
    assert merged.schema == schema
    assert merged.to_pylist() == [
        rows[0],
        {**rows[1], "status": "success", "error_message": None, "width": 7},
        {**rows[2], "error_message": "HTTP Error 410"},
    ]
    members = _tar(tmp_path, "00000")
    assert members == {"000000000.jpg": b"img0", "000000000.txt": b"c0", "000000001.jpg": b"img1",
                       "000000001.txt": b"c1", "000000001.json": json.dumps({"key": "000000001"}, indent=4).encode()}
    stats = json.loads((tmp_path / "00000_stats.json").read_text())
    assert (stats["count"], stats["successes"], stats["failed_to_download"], stats["duration"]) == (3, 2, 1, 1.0)
    assert stats["status_dict"] == {"HTTP Error 410": 1, "success": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.parquet", "00000.tar", "00000_stats.json"]
