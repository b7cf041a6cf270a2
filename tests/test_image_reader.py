"""Reading image bytes (stages/image_reader.py): one ranged read per run of neighbouring tar members at the
offsets ingest records, from local disk and fsspec's memory filesystem; members of a tar cut short stay
readable up to the cut; missing files and members are rejects of their rows alone; oversized members are
refused unread; transient errors are retried and, when they persist, fail the batch naming file and key.

Reads are observed through local filesystems under their own protocols: `counting://` records every
range it serves, `flaky://` (tests/testfs.py) fails the first reads its rules name with a dropped
connection."""

from __future__ import annotations

import io
import json
import random
import tarfile
import tempfile
from pathlib import Path

import fsspec
import pyarrow as pa
import pytest
from fsspec.implementations.local import LocalFileSystem

from grit_pipeline.assets.synthetic import write_img2dataset
from schemas.rows import RejectReason
from schemas.tables import CHUNK_TYPE
from stages.detect import DetectConfig, DetectStage
from stages.image_reader import GAP_BYTES, ImageLocation, locations_of, split_tar_ref
from stages.image_reader import read_images as read_checked
from stages.image_refs import ImageAllowList
from stages.images import ImageFailure
from stages.ingest import IngestConfig, IngestStage
from stages.retry import TransientIOError
from stages.sources.base import list_tar_files
from stages.tar_index import read_tar_index


class CountingFileSystem(LocalFileSystem):
    """The local disk, recording the (path, start, end) of every range read through `cat_file`."""

    protocol = ("counting",)
    reads: list[tuple[str, int | None, int | None]] = []

    def cat_file(self, path, start=None, end=None, **kwargs):
        CountingFileSystem.reads.append((path, start, end))
        return super().cat_file(path, start, end, **kwargs)


fsspec.register_implementation("counting", CountingFileSystem, clobber=True)


# local files (tmp_path) and the test filesystems over them; the allow-list itself is tested in test_image_refs.py
READABLE = ImageAllowList.of(True).with_roots(f"counting://{tempfile.gettempdir()}", f"flaky://{tempfile.gettempdir()}")


def read_images(locations, *args, **kwargs):
    return read_checked(locations, *args, allowed=READABLE, **kwargs)


@pytest.fixture(autouse=True)
def fresh_filesystems():
    CountingFileSystem.reads = []
    yield


@pytest.fixture
def flaky(tmp_path, monkeypatch):
    """`flaky://` with its fault rules in a folder of this test."""
    import testfs

    (tmp_path / "rules").mkdir()
    monkeypatch.setenv(testfs.FLAKY_DIR_ENV, str(tmp_path / "rules"))
    testfs.register()
    return testfs


def payload(seed: int, size: int = 3000) -> bytes:
    return random.Random(seed).randbytes(size)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> dict[str, tuple[int, int]]:
    """A tar of `members`; returns name -> (data offset, size) as tarfile itself reports them."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers()}


def webdataset_rows(n: int) -> list[tuple[str, bytes]]:
    """Members as img2dataset writes them: `<key>.jpg`, `<key>.txt`, `<key>.json` per row."""
    out = []
    for i in range(n):
        key = f"{i:09d}"
        out += [(f"{key}.jpg", payload(i)), (f"{key}.txt", b"a caption"), (f"{key}.json", json.dumps({"key": key}).encode())]
    return out


def located(tar: Path, index: dict[str, tuple[int, int]], name: str, protocol: str = "") -> ImageLocation:
    offset, size = index[name]
    return ImageLocation(f"tar://{name}::{protocol}{tar}", offset, size, key=name.split(".")[0])


def test_split_tar_ref():
    assert split_tar_ref("tar://00001.jpg::s3://bucket/shard-0000.tar") == ("s3://bucket/shard-0000.tar", "00001.jpg")
    assert split_tar_ref("tar://./00001.jpg::/data/0.tar") == ("/data/0.tar", "00001.jpg")
    assert split_tar_ref("/data/x.jpg") is None


def test_plain_files_a_missing_file_and_no_ref(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"abc")
    out = read_images([ImageLocation(str(tmp_path / "a.jpg")), ImageLocation(str(tmp_path / "missing.jpg"), key="k1"),
                       None])
    assert out[0] == b"abc"
    assert out[1].reason == RejectReason.IMAGE_UNREADABLE and "missing.jpg" in out[1].detail
    assert out[2].reason == RejectReason.IMAGE_UNREADABLE and "no image_ref" in out[2].detail


def test_neighbouring_members_are_fetched_with_one_ranged_read(tmp_path):
    tar = tmp_path / "00000.tar"
    index = write_tar(tar, webdataset_rows(6))
    names = [f"{i:09d}.jpg" for i in (4, 0, 2, 5, 1, 3)]  # any order: the reader sorts by offset
    out = read_images([located(tar, index, n, "counting://") for n in names])
    assert out == [payload(int(n[:9])) for n in names]
    first, last = index["000000000.jpg"], index["000000005.jpg"]
    assert CountingFileSystem.reads == [(str(tar), first[0], last[0] + last[1])]  # one request, only the span
    assert last[0] + last[1] - first[0] < tar.stat().st_size


def test_members_far_apart_get_a_request_each(tmp_path):
    tar = tmp_path / "00000.tar"
    filler = ("filler.bin", bytes(GAP_BYTES + 1024))
    index = write_tar(tar, [("a.jpg", payload(1)), filler, ("b.jpg", payload(2))])
    out = read_images([located(tar, index, "b.jpg", "counting://"), located(tar, index, "a.jpg", "counting://")])
    assert out == [payload(2), payload(1)]
    fetched = sum(end - start for _, start, end in CountingFileSystem.reads)
    assert len(CountingFileSystem.reads) == 2 and fetched == len(payload(1)) + len(payload(2))


def test_refs_without_a_location_are_found_from_the_tar_headers(tmp_path):
    tar = tmp_path / "00000.tar"
    write_tar(tar, webdataset_rows(3))
    out = read_images([ImageLocation(f"tar://000000002.jpg::{tar}"), ImageLocation(f"tar://./000000000.jpg::{tar}"),
                       ImageLocation(f"tar://nope.jpg::{tar}", key="k9")])
    assert out[:2] == [payload(2), payload(0)]
    assert out[2].reason == RejectReason.IMAGE_UNREADABLE and "nope.jpg" in out[2].detail


def test_a_missing_tar_is_a_reject_of_its_rows_only(tmp_path):
    tar = tmp_path / "00000.tar"
    index = write_tar(tar, webdataset_rows(2))
    gone = ImageLocation(f"tar://000000000.jpg::{tmp_path / 'gone.tar'}", *index["000000000.jpg"], key="k0")
    out = read_images([gone, located(tar, index, "000000001.jpg")])
    assert out[0].reason == RejectReason.IMAGE_UNREADABLE and "gone.tar" in out[0].detail
    assert out[1] == payload(1)


def test_members_over_max_bytes_are_refused_without_being_read(tmp_path):
    tar = tmp_path / "00000.tar"
    index = write_tar(tar, [("big.jpg", payload(1, 101)), ("small.jpg", payload(2, 100))])
    (tmp_path / "big.png").write_bytes(b"x" * 101)
    out = read_images([located(tar, index, "big.jpg", "counting://"), located(tar, index, "small.jpg", "counting://"),
                       ImageLocation(str(tmp_path / "big.png"))], max_bytes=100)
    assert out[1] == payload(2, 100)
    for failed in (out[0], out[2]):
        assert failed.reason == RejectReason.IMAGE_TOO_LARGE and "101 bytes > max_image_bytes 100" in failed.detail
    small = index["small.jpg"]
    assert CountingFileSystem.reads == [(str(tar), small[0], small[0] + small[1])]


def test_a_tar_cut_short_keeps_the_members_before_the_cut(tmp_path):
    tar = tmp_path / "00000.tar"
    index = write_tar(tar, webdataset_rows(4))
    cut_member = index["000000002.jpg"]
    with open(tar, "r+b") as f:
        f.truncate(cut_member[0] + cut_member[1] // 2)
    listed = {m.name: (m.offset, m.size) for m in list_tar_files(str(tar))}  # what ingest sees
    assert "000000002.jpg" in listed and "000000003.jpg" not in listed
    out = read_images([located(tar, listed, n) for n in ("000000000.jpg", "000000001.jpg", "000000002.jpg")])
    assert out[:2] == [payload(0), payload(1)]
    assert out[2].reason == RejectReason.IMAGE_UNREADABLE
    assert "000000002.jpg" in out[2].detail and f"only {cut_member[1] // 2} of its {cut_member[1]} bytes" in out[2].detail


def test_the_memory_filesystem_reads_like_local(tmp_path):
    tar = tmp_path / "00000.tar"
    index = write_tar(tar, webdataset_rows(3))
    mem = fsspec.filesystem("memory")
    mem.pipe("/reader-test/00000.tar", tar.read_bytes())
    try:
        names = ["000000001.jpg", "000000000.jpg"]
        out = read_images([located(Path("/reader-test/00000.tar"), index, n, "memory://") for n in names]
                          + [ImageLocation("tar://000000002.jpg::memory:///reader-test/00000.tar")])
        assert out == [payload(1), payload(0), payload(2)]
    finally:
        mem.rm("/reader-test", recursive=True)


# --- ingest -> detect over an img2dataset shard --------------------------------------------------------


def ingested(root: Path) -> pa.Table:
    stage = IngestStage(IngestConfig(format="img2dataset"))
    return stage.process_batch(stage.read(stage.discover(str(root))[0])).output


def with_chunks(table: pa.Table) -> pa.Table:
    chunk = {"start": 0, "end": 1, "root_start": 0, "root_end": 1, "expr_start": 0, "expr_end": 1, "has_conj": False}
    return table.append_column("chunks", pa.array([[chunk]] * table.num_rows, pa.list_(CHUNK_TYPE)))


DECODE = DetectConfig(backend="groundingdino", input_size=32)  # decodes like a pixel detector, loads no model


def test_a_truncated_img2dataset_tar_yields_its_intact_rows(tmp_path):
    source = write_img2dataset(tmp_path / "i2d", shards=1, rows_per_shard=30, bad_rows=False)
    tar = source.root / "00000.tar"
    members = {m.name: m for m in read_tar_index(str(tar))}
    cut_key = "000000017"
    cut = members[f"{cut_key}.jpg"]
    with open(tar, "r+b") as f:
        f.truncate(cut.offset + cut.size // 2)
    intact = sorted(n[:-4] for n, m in members.items() if n.endswith(".jpg") and m.offset + m.size <= cut.offset)

    stage = IngestStage(IngestConfig(format="img2dataset"))
    ingest = stage.process_batch(stage.read(stage.discover(str(source.root))[0]))
    after_the_cut = {r["key"] for r in ingest.rejects.to_pylist() if r["reason"] == "missing_image"}
    assert after_the_cut == {f"00000{i:04d}" for i in range(18, 30)}

    result = DetectStage(DECODE).prepare_batch(with_chunks(ingest.output))
    assert result.output["key"].to_pylist() == intact and len(intact) == 17
    (reject,) = result.rejects.to_pylist()
    assert reject["key"] == cut_key and reject["reason"] == "image_unreadable" and f"{cut_key}.jpg" in reject["detail"]


def test_ingest_locations_are_read_in_one_request_per_batch(tmp_path):
    source = write_img2dataset(tmp_path / "i2d", shards=1, rows_per_shard=20, bad_rows=False)
    table = ingested(source.root)
    refs = [r.replace("::", "::counting://", 1) for r in table["image_ref"].to_pylist()]
    table = table.set_column(table.schema.get_field_index("image_ref"), "image_ref", pa.array(refs, pa.string()))
    out = read_images(locations_of(table))
    with tarfile.open(source.root / "00000.tar") as tar:
        assert out == [tar.extractfile(f"{k}.jpg").read() for k in table["key"].to_pylist()]
    assert len(CountingFileSystem.reads) == 1


# --- transient errors ------------------------------------------------------------------------------------


def flaky_batch(root: Path) -> pa.Table:
    table = ingested(root)
    refs = [r.replace("::", "::flaky://", 1) for r in table["image_ref"].to_pylist()]
    return with_chunks(table.set_column(table.schema.get_field_index("image_ref"), "image_ref", pa.array(refs)))


def flaky_reader() -> DetectStage:
    stage = DetectStage(DECODE)
    stage.allowed_images = READABLE  # as the engine sets the run's list; flaky:// is no object store
    return stage


def test_a_transient_read_error_is_retried_and_the_batch_succeeds(tmp_path, flaky):
    source = write_img2dataset(tmp_path / "i2d", shards=1, rows_per_shard=8, bad_rows=False)
    batch = flaky_batch(source.root)
    hits = flaky.add_flaky_rule("tar-once", "00000.tar", failures=1)
    result = flaky_reader().prepare_batch(batch)
    assert len(hits.read_text().splitlines()) == 1  # failed once, then read
    assert result.rejects.num_rows == 0 and result.output["key"].to_pylist() == batch["key"].to_pylist()


def test_a_persistent_transient_error_fails_the_batch_naming_file_and_key(tmp_path, flaky):
    source = write_img2dataset(tmp_path / "i2d", shards=1, rows_per_shard=4, bad_rows=False)
    batch = flaky_batch(source.root)
    flaky.add_flaky_rule("tar-always", "00000.tar", failures=1000)
    with pytest.raises(TransientIOError) as raised:
        flaky_reader().prepare_batch(batch)
    message = str(raised.value)
    assert str(source.root / "00000.tar") in message and "key '000000000'" in message
    assert "ConnectionResetError" in message and "tries" in message
    assert not isinstance(raised.value, ImageFailure)
