"""Image references (stages/image_refs.py): one check before every read of a stored reference -- ingest's
existence listing, detect's reader, the report's thumbnails, the trainer's loader and `grit export`.

The hostile references of issue 21 (`../outside/x.jpg`, an absolute path, `file://...`,
`http://127.0.0.1:PORT/latest/meta-data/x.jpg`, a percent-encoded `..%2f`, symlinks in the input folder to
a file and to a folder outside it) go through each reader by default, with an allow-list and with `true`.
Every target holds a real JPEG, so a reference that were read would be kept: the kept rows show what was
read. A recording HTTP server on 127.0.0.1 answers every request with a JPEG and records it (none may
arrive), and an audit hook (`sys.addaudithook`: the interpreter's own `open` and directory-listing events)
records which files and folders this process opened or listed.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import sys
import tarfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from grit_pipeline.report.thumbnails import ImageUnavailable, load_images
from grit_pipeline.train.export import export_kosmos2
from grit_pipeline.train.images import ImageUnavailable as TrainImageUnavailable
from grit_pipeline.train.images import read_image_bytes
from schemas.rows import RejectReason
from schemas.tables import CHUNK_TYPE
from stages.detect import DetectConfig, DetectStage
from stages.image_reader import ImageLocation
from stages.image_refs import ImageAllowList, check_refs
from stages.ingest import IngestConfig, IngestStage

NOT_ALLOWED, WEB = RejectReason.IMAGE_NOT_ALLOWED.value, RejectReason.IMAGE_WEB_URL.value
DECODE = DetectConfig(backend="groundingdino", input_size=32)  # decodes like a pixel detector, loads no model


def jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(buf, format="JPEG")
    return buf.getvalue()


# --- what this process touches and what the web sees ------------------------------------------------------

_touched: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _touched is not None and event in ("open", "os.listdir", "os.scandir") and args:
        if isinstance(args[0], str | bytes | os.PathLike):
            _touched.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # cannot be removed; records only inside `touched()`


@contextmanager
def touched(under: Path):
    """Paths under `under` that this process opened or listed inside the block (a list filled on exit)."""
    global _touched
    _touched, seen = [], []
    try:
        yield seen
    finally:
        seen += [p for p in _touched if p.startswith(str(under))]
        _touched = None


@dataclass
class Web:
    url: str
    requests: list[str]


@pytest.fixture
def web():
    """A local HTTP server that answers every GET/HEAD with a JPEG and records the request."""
    requests: list[str] = []
    body = jpeg((200, 10, 10))

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self, with_body: bool) -> None:
            requests.append(f"{self.command} {self.path}")
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def do_GET(self):  # noqa: N802 - http.server's naming
            self._answer(True)

        def do_HEAD(self):  # noqa: N802
            self._answer(False)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Web(f"http://127.0.0.1:{server.server_address[1]}", requests)
    server.shutdown()
    server.server_close()


# --- the hostile tree -------------------------------------------------------------------------------------


@dataclass
class Tree:
    root: Path  # holds in/, outside/, allowed/, allowed-evil/
    cases: dict[str, str]  # case name -> image path value as a source row writes it

    @property
    def input(self) -> Path:
        return self.root / "in"

    def config(self, mode: str) -> dict:
        return {"default": {}, "allow_list": {"external_images": [f"{self.root}/allowed/"]},
                "anywhere": {"external_images": True}}[mode]


@pytest.fixture
def tree(tmp_path, web) -> Tree:
    root = tmp_path
    for folder, name, color in (("in/images", "ok.jpg", (0, 90, 0)), ("in/images", "inner.jpg", (0, 0, 90)),
                                ("outside", "x.jpg", (90, 0, 0)), ("allowed", "y.jpg", (90, 90, 0)),
                                ("allowed-evil", "z.jpg", (0, 90, 90))):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / name).write_bytes(jpeg(color))
    (root / "in/images/link-in.jpg").symlink_to("inner.jpg")
    (root / "in/link-out.jpg").symlink_to("../outside/x.jpg")
    (root / "in/linkdir").symlink_to("../outside")
    port = web.url.rsplit(":", 1)[1]
    cases = {
        "inside": "images/ok.jpg",
        "inside_link": "images/link-in.jpg",
        "climbs": "../outside/x.jpg",
        "absolute": f"{root}/outside/x.jpg",
        "file_url": f"file://{root}/outside/x.jpg",
        "file_host": f"file://localhost{root}/outside/x.jpg",
        "metadata": f"{web.url}/latest/meta-data/x.jpg",
        "https": f"https://127.0.0.1:{port}/x.jpg",
        "encoded": "images/..%2f..%2foutside/x.jpg",
        "link_file": "link-out.jpg",
        "link_dir": "linkdir/x.jpg",
        "allowed": f"{root}/allowed/y.jpg",
        "allowed_file_url": f"file://{root}/allowed/y.jpg",
        "neighbour": f"{root}/allowed-evil/z.jpg",
        "allowed_climb": f"{root}/allowed/../outside/x.jpg",
    }
    return Tree(root, cases)


KEPT = {
    "default": {"inside", "inside_link"},
    "allow_list": {"inside", "inside_link", "allowed", "allowed_file_url"},
    "anywhere": {"inside", "inside_link", "absolute", "file_url", "link_file", "link_dir", "allowed",
                 "allowed_file_url", "neighbour"},
}
WEB_CASES = {"metadata", "https"}


def with_chunks(table: pa.Table) -> pa.Table:
    chunk = {"start": 0, "end": 1, "root_start": 0, "root_end": 1, "expr_start": 0, "expr_end": 1, "has_conj": False}
    return table.append_column("chunks", pa.array([[chunk]] * table.num_rows, pa.list_(CHUNK_TYPE)))


def write_source(tree: Tree, kind: str) -> None:
    rows = [{"key": f"k_{name}", "caption": f"a photo ({name})", "url": f"u{i}", "image_path": value}
            for i, (name, value) in enumerate(tree.cases.items())]
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), tree.input / "meta.parquet")
    else:
        (tree.input / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("kind", ["parquet", "folder"])
@pytest.mark.parametrize("mode", ["default", "allow_list", "anywhere"])
def test_sources_read_exactly_the_allowed_references(tree, web, kind, mode):
    write_source(tree, kind)
    stage = IngestStage(IngestConfig(format=kind, **tree.config(mode)))
    with touched(tree.root) as paths:
        (shard,) = stage.discover(str(tree.input))
        result = stage.process_batch(stage.read(shard))
        detect = DetectStage(DECODE)
        detect.allowed_images = stage.image_allow_list(str(tree.input))  # as the engine hands it on
        prepared = detect.prepare_batch(with_chunks(result.output))

    kept = {k[2:] for k in result.output["key"].to_pylist()}
    assert kept == KEPT[mode]
    assert prepared.output["key"].to_pylist() == result.output["key"].to_pylist()  # read and decoded
    assert prepared.rejects.num_rows == 0
    rejects = {r["key"][2:]: (r["reason"], r["detail"]) for r in result.rejects.to_pylist()}
    assert set(rejects) == set(tree.cases) - KEPT[mode]  # neighbours of refused rows are kept
    for name, (reason, detail) in rejects.items():
        assert reason == (WEB if name in WEB_CASES else NOT_ALLOWED), (name, detail)
    assert "grit download" in rejects["metadata"][1] and "/latest/meta-data/x.jpg" in rejects["metadata"][1]
    assert web.requests == []

    allowed_dirs = {"default": ("in",), "allow_list": ("in", "allowed"),
                    "anywhere": ("in", "outside", "allowed", "allowed-evil")}[mode]
    outside = [p for p in paths if Path(p).relative_to(tree.root).parts[0] not in allowed_dirs]
    assert outside == []  # nothing outside the allowed places was opened or listed
    if mode == "allow_list":
        assert f"{tree.root}/allowed/y.jpg" in paths  # ... and the allowed one was read


def test_img2dataset_tars_and_files_linked_from_outside_are_refused_unread(tmp_path, web):
    from grit_pipeline.assets.synthetic import write_img2dataset

    source = write_img2dataset(tmp_path / "in", shards=2, rows_per_shard=4, bad_rows=False)
    outside = tmp_path / "outside"
    outside.mkdir()
    (source.root / "00000.tar").rename(outside / "00000.tar")  # shard 0: its tar is a link to elsewhere
    (source.root / "00000.tar").symlink_to(outside / "00000.tar")
    files = source.root / "00001"  # shard 1 in img2dataset's `files` layout, one image a link to elsewhere
    with tarfile.open(source.root / "00001.tar") as tar:
        tar.extractall(files, filter="data")
    (source.root / "00001.tar").unlink()
    (files / "000010002.jpg").rename(outside / "000010002.jpg")
    (files / "000010002.jpg").symlink_to(outside / "000010002.jpg")

    def run(**cfg):
        stage = IngestStage(IngestConfig(format="img2dataset", **cfg))
        with touched(tmp_path) as paths:
            results = [stage.process_batch(stage.read(s)) for s in stage.discover(str(source.root))]
        kept = sorted(k for r in results for k in r.output["key"].to_pylist())
        refused = sorted(r["key"] for res in results for r in res.rejects.to_pylist() if r["reason"] == NOT_ALLOWED)
        return kept, refused, paths

    kept, refused, paths = run()
    assert kept == ["000010000", "000010001", "000010003"]
    assert refused == ["000000000", "000000001", "000000002", "000000003", "000010002"]
    assert not [p for p in paths if p.startswith(str(outside))]  # the linked tar was never opened
    kept, refused, _ = run(external_images=[str(outside)])
    assert len(kept) == 8 and refused == []
    assert web.requests == []


# --- the one check, as the other readers use it ------------------------------------------------------------


def hostile_locations(tree: Tree) -> dict[str, ImageLocation]:
    """The cases as stored references (what a tampered ingest output or a GrIT shard could hold)."""
    out = {}
    for name, value in tree.cases.items():
        ref = value if ("://" in value or value.startswith("/")) else f"{tree.input}/{value}"
        out[name] = ImageLocation(ref, key=f"k_{name}")
    return out


def test_detect_refuses_stored_references_outside_the_run(tree, web):
    locations = hostile_locations(tree)
    table = pa.table({"key": [loc.key for loc in locations.values()], "caption": ["a photo"] * len(locations),
                      "image_ref": [loc.ref for loc in locations.values()]})
    detect = DetectStage(DECODE)
    detect.allowed_images = IngestStage(IngestConfig(**tree.config("allow_list"))).image_allow_list(str(tree.input))
    with touched(tree.root) as paths:
        result = detect.prepare_batch(with_chunks(table))
    kept = {k[2:] for k in result.output["key"].to_pylist()}
    # detect sees absolute refs: a relative value joined onto the input is judged by where it lands
    assert kept == {"inside", "inside_link", "allowed", "allowed_file_url"}
    reasons = {r["key"][2:]: r["reason"] for r in result.rejects.to_pylist()}
    assert reasons["metadata"] == reasons["https"] == WEB
    assert {reasons[n] for n in reasons if n not in WEB_CASES} == {NOT_ALLOWED}
    assert not [p for p in paths if not p.startswith((f"{tree.root}/in", f"{tree.root}/allowed/"))]
    assert web.requests == []


def test_report_thumbnails_read_only_allowed_references(tree, web):
    locations = hostile_locations(tree)
    allowed = ImageAllowList.of([f"{tree.root}/allowed"]).with_roots(str(tree.input))
    with touched(tree.root) as paths:
        images = dict(zip(locations, load_images(list(locations.values()), allowed, longest_side=8), strict=True))
    read = {name for name, img in images.items() if not isinstance(img, ImageUnavailable)}
    assert read == {"inside", "inside_link", "allowed", "allowed_file_url"}
    assert str(images["metadata"]).startswith("image_web_url:")
    assert str(images["link_file"]).startswith("image_not_allowed:") and "symlink" in str(images["link_file"])
    assert not [p for p in paths if not p.startswith((f"{tree.root}/in", f"{tree.root}/allowed/"))]
    assert web.requests == []


def test_trainer_loader_reads_the_shard_folder_and_its_allow_list_only(tree, web):
    shard = str(tree.input / "shard-00000.parquet")  # a GrIT shard beside the images: its folder is allowed
    ok = {name for name, value in tree.cases.items()
          if _loads(lambda v=value: read_image_bytes({"key": "k", "url": v}, shard))}
    assert ok == {"inside", "inside_link"}
    ok = {name for name, value in tree.cases.items()
          if _loads(lambda v=value: read_image_bytes({"key": "k", "url": v}, shard, [f"{tree.root}/allowed/"]))}
    assert ok == {"inside", "inside_link", "allowed", "allowed_file_url"}
    with pytest.raises(TrainImageUnavailable, match="image_web_url"):
        read_image_bytes({"key": "k", "image_ref": tree.cases["metadata"]}, shard, True)
    assert web.requests == []


def _loads(read) -> bool:
    try:
        read()
    except TrainImageUnavailable:
        return False
    return True


def test_export_copies_only_allowed_images(tree, web, tmp_path_factory):
    names = list(tree.cases)
    pq.write_table(pa.table({"key": [f"k_{n}" for n in names], "url": list(tree.cases.values()),
                             "grounded_caption": ["<grounding>a photo"] * len(names)}),
                   tree.input / "shard-00000.parquet")
    out = tmp_path_factory.mktemp("export")
    with touched(tree.root) as paths:
        summary = export_kosmos2(str(tree.input / "shard-00000.parquet"), str(out / "a"))
    assert summary["rows"] == 2 and summary["missing_images"] == len(names) - 2
    exported = [json.loads(line)["key"] for line in (out / "a" / "metadata.jsonl").read_text().splitlines()]
    assert exported == ["k_inside", "k_inside_link"]
    assert not [p for p in paths if not p.startswith(f"{tree.root}/in")]
    summary = export_kosmos2(str(tree.input / "shard-00000.parquet"), str(out / "b"),
                             external_images=[f"file://{tree.root}/allowed"])
    assert summary["rows"] == 4
    assert web.requests == []
    with pytest.raises(ValueError, match="never read"):
        export_kosmos2(str(tree.input / "shard-00000.parquet"), str(out / "c"), external_images=[tree.cases["https"]])


# --- the rules, one reference at a time ----------------------------------------------------------------------

ROOT = "/data/in"
CHECKS = [
    # (reference, allow-list ("root", "list": root + s3://my-images/ + /mnt/images/, "any"), expected reason)
    ("/data/in/a.jpg", "root", None),
    ("/data/in/sub/./b.jpg", "root", None),
    ("/data/in//c.jpg", "root", None),
    ("file:///data/in/a.jpg", "root", None),
    ("FILE:///data/in/a.jpg", "root", None),
    ("local:///data/in/a.jpg", "root", None),
    ("tar://000001.jpg::/data/in/00000.tar", "root", None),
    ("/data/in", "root", NOT_ALLOWED),  # the folder itself holds no image
    ("/data/in-evil/a.jpg", "root", NOT_ALLOWED),  # components, not string prefixes
    ("/data/in/../x.jpg", "root", NOT_ALLOWED),
    ("/data/in/%2e%2e/x.jpg", "root", NOT_ALLOWED),
    ("/data/in/..%2Fx.jpg", "root", NOT_ALLOWED),
    ("/data/in/a%252fb.jpg", "root", NOT_ALLOWED),
    ("/data/in/a%20b.jpg", "root", None),  # other escapes are literal characters of the name
    ("file://localhost/data/in/a.jpg", "root", NOT_ALLOWED),  # fsspec reads it relative to the cwd
    ("file:data/in/a.jpg", "root", NOT_ALLOWED),
    ("data/in/a.jpg", "root", NOT_ALLOWED),
    ("~/a.jpg", "root", NOT_ALLOWED),
    ("/data/in/a\x00.jpg", "root", NOT_ALLOWED),
    ("simplecache::/data/in/a.jpg", "root", NOT_ALLOWED),
    ("zip://a.jpg", "root", NOT_ALLOWED),
    ("TAR://a.jpg::/data/in/0.tar", "root", NOT_ALLOWED),
    ("tar://a.jpg::tar://b.tar::/data/in/0.tar", "root", NOT_ALLOWED),
    ("tar://a.jpg::/etc/0.tar", "root", NOT_ALLOWED),
    ("http://169.254.169.254/latest/meta-data/x.jpg", "any", WEB),
    ("HTTPS://example.com/x.jpg", "list", WEB),
    ("https://example.com/../x.jpg", "root", WEB),
    ("tar://a.jpg::http://example.com/0.tar", "any", WEB),
    ("s3://my-images/a/b.jpg", "list", None),
    ("s3a://my-images/a/b.jpg", "list", None),
    ("S3://my-images/a/b.jpg", "list", None),
    ("s3://my-images-evil/a.jpg", "list", NOT_ALLOWED),
    ("s3://other/a.jpg", "list", NOT_ALLOWED),
    ("s3://my-images/../other/a.jpg", "list", NOT_ALLOWED),
    ("/mnt/images/x.jpg", "list", None),
    ("/mnt/images-evil/x.jpg", "list", NOT_ALLOWED),
    ("/etc/passwd", "list", NOT_ALLOWED),
    ("/etc/passwd", "any", None),
    ("gs://bucket/x.jpg", "any", None),
    ("memory://x.jpg", "any", None),
    ("ftp://host/x.jpg", "any", NOT_ALLOWED),
    ("hf://datasets/x/y.jpg", "any", NOT_ALLOWED),
    ("/data/in/../x.jpg", "any", NOT_ALLOWED),
]
LISTS = {"root": ImageAllowList().with_roots(ROOT),
         "list": ImageAllowList.of(["s3://my-images/", "/mnt/images/"]).with_roots(ROOT),
         "any": ImageAllowList.of(True)}


@pytest.mark.parametrize(("ref", "allowed", "reason"), CHECKS)
def test_check(ref, allowed, reason):
    (got,) = check_refs([ref], LISTS[allowed])
    assert (got.reason.value if got else None) == reason, got


def test_symlinks_are_judged_by_where_they_lead(tmp_path):
    for folder in ("in/sub", "outside", "other"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "real").mkdir()
    (tmp_path / "in/inner.jpg").write_bytes(b"x")
    (tmp_path / "in/to-inner.jpg").symlink_to("inner.jpg")
    (tmp_path / "in/to-outside.jpg").symlink_to(tmp_path / "outside/x.jpg")
    (tmp_path / "in/to-other.jpg").symlink_to(tmp_path / "other/x.jpg")
    (tmp_path / "in/dir").symlink_to(tmp_path / "outside")
    (tmp_path / "in/dangling.jpg").symlink_to(tmp_path / "outside/none.jpg")
    (tmp_path / "linked-root").symlink_to(tmp_path / "real")  # an allowed prefix that is itself a link
    refs = [f"{tmp_path}/in/to-inner.jpg", f"{tmp_path}/in/to-outside.jpg", f"{tmp_path}/in/to-other.jpg",
            f"{tmp_path}/in/dir/x.jpg", f"{tmp_path}/in/dangling.jpg", f"{tmp_path}/in/sub/../inner.jpg",
            f"{tmp_path}/linked-root/a.jpg", f"{tmp_path}/real/a.jpg", None]
    allowed = ImageAllowList.of([str(tmp_path / "other"), str(tmp_path / "linked-root")]).with_roots(
        str(tmp_path / "in"))
    got = [r.reason.value if r else None for r in check_refs(refs, allowed)]
    # the spelled place must be inside a prefix too: `real/` is only reachable as `linked-root/`
    assert got == [None, NOT_ALLOWED, None, NOT_ALLOWED, NOT_ALLOWED, NOT_ALLOWED, None, NOT_ALLOWED, None]
    # `true` allows any local path (links are not followed), but never a `..`
    got = [r.reason.value if r else None for r in check_refs(refs, ImageAllowList.of(True))]
    assert got == [None] * 5 + [NOT_ALLOWED] + [None] * 3


def test_details_show_the_reference_escaped():
    (outside,) = check_refs(["/etc/\u202egpj.exe\x1b[2J"], LISTS["root"])
    assert "\x1b" not in outside.detail and "\\x1b" in outside.detail
    (bidi,) = check_refs(["/etc/\u202egpj.exe"], LISTS["root"])
    assert "\u202e" not in bidi.detail and "\\u202e" in bidi.detail and "ingest.external_images" in bidi.detail
    (long,) = check_refs(["s3://b/" + "a" * 5000], LISTS["root"])
    assert len(long.detail) < 600


def test_external_images_setting():
    assert IngestConfig().external_images is False
    assert IngestConfig(external_images=True).external_images is True
    spelled = IngestConfig(external_images=["s3a://b/x/", "/mnt/images/", "file:///mnt/images", "s3://b/x"])
    assert spelled.external_images == ["/mnt/images", "s3://b/x"]
    assert IngestConfig(external_images="s3://b/x").external_images == ["s3://b/x"]
    assert IngestConfig(external_images=[]).external_images is False
    for bad in (["http://example.com/"], ["images/"], ["/a/../b"], ["s3://"], ["zip://a"]):
        with pytest.raises(ValidationError):
            IngestConfig(external_images=bad)


def test_true_warns_naming_the_risk(tmp_path, caplog):
    (tmp_path / "captions.jsonl").write_text('{"file": "a.jpg", "caption": "a cat"}\n')
    IngestStage(IngestConfig(external_images=True)).discover(str(tmp_path))
    assert "any local file or object-store object" in caplog.text


# --- end to end ----------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_a_run_publishes_exactly_the_allowed_rows_and_nothing_reads_the_rest(ray_local, tmp_path, web):
    """A Parquet source whose rows hold the hostile references, run with an allow-list through the real
    stages (replay detections), then read back by the report, the trainer's loader and the export."""
    from grit_pipeline.api import run_pipeline
    from grit_pipeline.assets.synthetic import replay_overrides, write_img2dataset
    from grit_pipeline.report.gallery import build_gallery
    from grit_pipeline.report.run_files import RunFiles
    from grit_pipeline.train.dataset import iter_rows, list_shards

    synthetic = write_img2dataset(tmp_path / "synthetic", shards=1, rows_per_shard=12, bad_rows=False)
    meta = pq.read_table(synthetic.root / "00000.parquet").to_pylist()
    src, outside, allowed = tmp_path / "in", tmp_path / "outside", tmp_path / "allowed"
    for folder in (src / "images", outside, allowed):
        folder.mkdir(parents=True)
    with tarfile.open(synthetic.root / "00000.tar") as tar:
        images = {row["key"]: tar.extractfile(f"{row['key']}.jpg").read() for row in meta}
    hostile = {  # row -> its image path; every target is a real JPEG
        1: "../outside/{k}.jpg", 2: f"{outside}/{{k}}.jpg", 3: f"file://{outside}/{{k}}.jpg",
        4: f"{web.url}/latest/meta-data/{{k}}.jpg", 5: "images/..%2f..%2foutside/{k}.jpg", 6: "link-{k}.jpg",
        7: f"{allowed}/{{k}}.jpg", 8: f"{tmp_path}/allowed-evil/{{k}}.jpg",
    }
    (tmp_path / "allowed-evil").mkdir()
    rows = []
    for i, row in enumerate(meta):
        key = row["key"]
        for folder in (src / "images", outside, allowed, tmp_path / "allowed-evil"):
            (folder / f"{key}.jpg").write_bytes(images[key])
        (src / f"link-{key}.jpg").symlink_to(outside / f"{key}.jpg")
        rows.append({"key": key, "caption": row["caption"], "url": row["url"],
                     "image_path": hostile.get(i, "images/{k}.jpg").format(k=key)})
    pq.write_table(pa.Table.from_pylist(rows), src / "meta.parquet")
    out = tmp_path / "run"
    result = run_pipeline(None, input=str(src), output=str(out), overrides=[
        *replay_overrides(synthetic.detections), "run.progress=false", "select.min_score=0.25",  # boxes for all
        f"ingest.external_images=[{allowed}/]"])
    assert result.ok

    published = sorted(k for s in list_shards(str(out / "grit")) for k in pq.read_table(s, columns=["key"])["key"]
                       .to_pylist())
    expected = sorted(r["key"] for i, r in enumerate(rows) if i not in hostile or i == 7)
    dropped_later = {(r["key"], r["reason"]) for s in (out / "stages").glob("*/*/*.rejects.parquet")
                     for r in pq.read_table(s).to_pylist() if r["stage"] != "ingest"}
    assert published == expected, dropped_later  # what was read is kept: nothing refused reaches detect
    ingest_rejects = {r["key"]: r["reason"] for s in (out / "stages" / "ingest").glob("*/*.rejects.parquet")
                      for r in pq.read_table(s).to_pylist()}
    assert ingest_rejects == {rows[i]["key"]: WEB if i == 4 else NOT_ALLOWED for i in hostile if i != 7}
    import yaml

    recorded = yaml.safe_load((out / "run.yaml").read_text())["allowed_images"]
    assert recorded == sorted([str(src), str(allowed)])

    gallery = build_gallery(RunFiles.open(str(out)), dict.fromkeys(published, 0), len(published))
    assert sorted(g.key for g in gallery) == published
    assert all(g.image_uri and not g.image_error for g in gallery)  # thumbnails read through the run's list
    shards = list_shards(str(out / "grit"))
    loaded = [read_image_bytes(row, s) for s in shards for row in iter_rows(s)]
    assert len(loaded) == len(published)
    summary = export_kosmos2(str(out / "grit"), str(tmp_path / "export"))
    assert summary["rows"] == len(published) and summary["missing_images"] == 0
    assert web.requests == []
