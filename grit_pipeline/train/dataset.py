"""Streaming dataset over GrIT Parquet shards through fsspec, sharded across ranks and DataLoader workers.

Each epoch the shard list is permuted with (seed, epoch) and dealt out round-robin over the global
readers, reader id = worker * world_size + rank; every (rank, worker) reads disjoint whole shards and
together they read every row once. Ids interleave ranks first, so each rank gets a shard whenever there
are at least `world_size` shards. Rows pass through a shuffle buffer seeded with (seed, epoch, reader);
images are decoded and resized only when a row leaves the buffer. Given the same shards, seed, ranks and
workers the stream is identical from run to run (the DataLoader hands out batches in worker order).

A sample is the Kosmos-2 sequence `<s><image> <image_pad>*N </image> [<grounding>] caption </s>`, where a
fraction `grounding_fraction` of rows (chosen by hashing seed and key) use `grounded_caption` and the
others the plain `caption`. Labels cover the caption tokens and `</s>` only.
"""

from __future__ import annotations

import logging
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from grit_pipeline.errors import BadInput, UserError, local_path, reading
from grit_pipeline.train.images import ImageUnavailable, decode_image, read_image_bytes, run_image_refs
from grit_pipeline.train.tokenizer import GroundedTokenizer

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Columns the trainer reads when present; everything else in a shard is left on disk.
ROW_COLUMNS = ("key", "caption", "grounded_caption", "url", "image_ref", "image_bytes")


SHARDS_EXPECTED = "expected GrIT shards: a run directory, a folder of .parquet shards, a file or a glob"


class NoShards(UserError, FileNotFoundError):
    """`--data` names no GrIT shard: nothing there, or nothing that ends in .parquet."""


def list_shards(uris: str | list[str]) -> list[str]:
    """Parquet shards named by `uris`: files, globs, folders of shards, or run directories (their
    `grit/` folder). Comma-separated strings are split. Reject/stats files are skipped. Sorted, as
    fsspec URLs with their protocol."""
    if isinstance(uris, str):
        uris = [u for u in uris.split(",") if u]
    found: list[str] = []
    for uri in uris:
        fs, path = fsspec.core.url_to_fs(uri)
        if any(c in path for c in "*?["):
            paths = fs.glob(path)
        elif fs.isdir(path):
            base = path.rstrip("/")
            grit_dir = f"{base}/grit"
            paths = fs.glob(f"{grit_dir}/*.parquet") if fs.isdir(grit_dir) else fs.glob(f"{base}/*.parquet")
        elif fs.exists(path):
            paths = [path]
        else:
            raise NoShards(f"{uri}: no such file or folder ({SHARDS_EXPECTED})")
        found.extend(fs.unstrip_protocol(p) for p in paths if not p.endswith(".rejects.parquet"))
    if not found:
        raise NoShards(f"{', '.join(uris)}: no .parquet shards there ({SHARDS_EXPECTED})")
    return sorted(set(found))


def iter_rows(shard: str, columns: tuple[str, ...] = ROW_COLUMNS, batch_size: int = 256) -> Iterator[dict]:
    """Rows of one shard as dicts of the wanted columns that exist in it, in file order. A wanted
    `image_ref` the shard lacks is looked up (with the image's location in its tar) in the pipeline run
    the shard belongs to, if any."""
    with fsspec.open(shard, "rb") as f:
        with reading(shard, "Parquet file"):
            pf = pq.ParquetFile(f)
        present = [c for c in columns if c in pf.schema_arrow.names]
        if "key" not in present:
            raise BadInput(f"{local_path(shard)}: not a GrIT shard (no 'key' column)")
        refs = run_image_refs(shard) if "image_ref" in columns and "image_ref" not in present else {}
        batches = pf.iter_batches(batch_size=batch_size, columns=present)
        while True:
            with reading(shard, "Parquet file"):  # a damaged page fails here, naming its shard
                batch = next(batches, None)
            if batch is None:
                return
            for row in batch.to_pylist():
                if refs:
                    row.update(refs.get(row["key"]) or {"image_ref": None})
                yield row


def assign_shards(shards: list[str], seed: int, epoch: int, reader: int, num_readers: int) -> list[str]:
    """The shards reader `reader` of `num_readers` reads in `epoch`: a (seed, epoch) permutation dealt
    round-robin. Disjoint across readers, and their union is `shards`."""
    order = list(shards)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order[reader::num_readers]


def is_grounded(key: str, seed: int, fraction: float) -> bool:
    """Whether this row trains on its grounded caption; stable per (seed, key) across epochs and runs."""
    if fraction >= 1.0:
        return True
    return zlib.crc32(f"{seed}:{key}".encode()) / 2**32 < fraction


@dataclass
class SequenceLayout:
    """How many vision embeddings sit between `<image>` and `</image>`, and the text length budget."""

    num_image_tokens: int
    max_text_tokens: int


def build_sequence(tok: GroundedTokenizer, text: str, layout: SequenceLayout) -> tuple[list[int], list[int]]:
    """input ids and labels of one sample; labels are IGNORE_INDEX on the image part and `<grounding>`."""
    prefix = [tok.bos_id, tok.image_start_id] + [tok.image_pad_id] * layout.num_image_tokens + [tok.image_end_id]
    text_ids = tok.encode(text)[: layout.max_text_tokens] + [tok.eos_id]
    ids = prefix + text_ids
    labels = [IGNORE_INDEX] * len(prefix) + text_ids
    if text_ids and text_ids[0] == tok.grounding_id:
        labels[len(prefix)] = IGNORE_INDEX
    return ids, labels


class GritStreamingDataset(IterableDataset):
    """One epoch of training samples per iteration; call `set_epoch` before each epoch."""

    def __init__(
        self,
        shards: list[str],
        tokenizer: GroundedTokenizer,
        layout: SequenceLayout,
        image_size: int,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        grounding_fraction: float = 1.0,
        rank: int | None = None,
        world_size: int | None = None,
        on_missing_image: str = "skip",
        external_images: bool | list[str] = False,
    ):
        if on_missing_image not in ("skip", "error"):
            raise ValueError("on_missing_image must be 'skip' or 'error'")
        if rank is None or world_size is None:
            dist = torch.distributed
            initialized = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if initialized else 0
            world_size = dist.get_world_size() if initialized else 1
        if len(shards) < world_size:
            raise ValueError(f"{len(shards)} shards cannot feed {world_size} ranks: write more, smaller shards")
        self.shards = list(shards)
        self.tokenizer = tokenizer
        self.layout = layout
        self.image_size = image_size
        self.seed = seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.grounding_fraction = grounding_fraction
        self.rank, self.world_size = rank, world_size
        self.on_missing_image = on_missing_image
        self.external_images = external_images
        self.epoch = 0
        self.skipped = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def reader(self) -> tuple[int, int]:
        """(this reader's id, number of readers) for the calling process."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return worker * self.world_size + self.rank, workers * self.world_size

    def my_shards(self) -> list[str]:
        reader, readers = self.reader()
        return assign_shards(self.shards, self.seed, self.epoch, reader, readers)

    def _rows(self) -> Iterator[tuple[str, dict]]:
        for shard in self.my_shards():
            for row in iter_rows(shard):
                yield shard, row

    def _shuffled(self) -> Iterator[tuple[str, dict]]:
        reader, _ = self.reader()
        rng = random.Random(f"{self.seed}:{self.epoch}:{reader}")
        buffer: list[tuple[str, dict]] = []
        for item in self._rows():
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            j = rng.randrange(len(buffer))
            buffer[j], item = item, buffer[j]
            yield item
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict]:
        for shard, row in self._shuffled():
            key = row["key"]
            try:
                pixels = decode_image(read_image_bytes(row, shard, self.external_images), self.image_size)
            except (ImageUnavailable, OSError, ValueError) as e:
                if self.on_missing_image == "error":
                    raise ImageUnavailable(f"{shard}: key {key!r}: {e}") from e
                self.skipped += 1
                log.warning("skipping row: %s", e)
                continue
            grounded = bool(row.get("grounded_caption")) and is_grounded(key, self.seed, self.grounding_fraction)
            text = row["grounded_caption"] if grounded else row["caption"]
            ids, labels = build_sequence(self.tokenizer, text, self.layout)
            yield {"key": key, "pixel_values": pixels, "input_ids": ids, "labels": labels}


def collate(samples: list[dict], pad_id: int = 0) -> dict:
    """Right-pads a list of samples into tensors (causal attention never sees the padding)."""
    longest = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s["input_ids"])] = torch.tensor(s["input_ids"])
        labels[i, : len(s["labels"])] = torch.tensor(s["labels"])
    return {
        "keys": [s["key"] for s in samples],
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "input_ids": ids,
        "labels": labels,
    }
