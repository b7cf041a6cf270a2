"""Arrow schemas of each stage's output, of rejects, and of the final GRIT shards.

A stage's output holds `key` plus the columns that stage adds (DESIGN.md, "Run directory"); the engine
joins upstream outputs on `key` before handing a batch to the next stage. Every schema here is the
contract between two stages and between the pipeline and its users.
"""

from __future__ import annotations

import pyarrow as pa

KEY = pa.field("key", pa.string(), nullable=False)

# --- rejects -------------------------------------------------------------------------------------------
REJECT_SCHEMA = pa.schema(
    [
        KEY,
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),  # short enum-like string, see schemas.rows.RejectReason
        pa.field("detail", pa.string()),
    ]
)

# --- ingest --------------------------------------------------------------------------------------------
# `image_ref` says where the image bytes live, as an fsspec URL: a plain path or URL for a file, or
# fsspec's chained form `tar://<member>::<tar url>` for a webdataset member; null when there is no image
# (GRIT-20M metadata re-processing). For a tar member, `image_offset` and `image_size` give the byte offset
# (from the start of the tar) and the size of the member's data, so readers fetch exactly those bytes with
# one ranged read (`stages.image_reader`); both are null for other refs.
INGEST_FIELDS = [
    KEY,
    pa.field("shard", pa.int32(), nullable=False),
    pa.field("url", pa.string()),
    pa.field("caption", pa.string(), nullable=False),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("image_ref", pa.string()),
    pa.field("image_offset", pa.int64()),
    pa.field("image_size", pa.int64()),
]
INGEST_SCHEMA = pa.schema(INGEST_FIELDS)  # passthrough columns follow these, in source order
INGEST_COLUMNS = tuple(f.name for f in INGEST_FIELDS)

# Source columns that clash with columns the pipeline produces are renamed with this prefix by ingest
# (a GRIT-20M file carries `noun_chunks`/`ref_exps`; the replay detector reads `src_noun_chunks`).
SOURCE_PREFIX = "src_"
PRODUCED_COLUMNS = ("noun_chunks", "ref_exps", "grounded_caption", "markdown_caption", "chunks",
                    "candidates", "pairs", "shard", "image_ref", "image_offset", "image_size")

# --- chunks --------------------------------------------------------------------------------------------
# Character offsets into `caption`, end-exclusive. `expr_*` is the referring expression (the chunk root's
# dependency subtree, or the chunk itself when it has conjuncts).
CHUNK_TYPE = pa.struct(
    [
        pa.field("start", pa.int32(), nullable=False),
        pa.field("end", pa.int32(), nullable=False),
        pa.field("root_start", pa.int32(), nullable=False),
        pa.field("root_end", pa.int32(), nullable=False),
        pa.field("expr_start", pa.int32(), nullable=False),
        pa.field("expr_end", pa.int32(), nullable=False),
        pa.field("has_conj", pa.bool_(), nullable=False),
    ]
)
CHUNKS_SCHEMA = pa.schema([KEY, pa.field("chunks", pa.list_(CHUNK_TYPE), nullable=False)])

# --- detect --------------------------------------------------------------------------------------------
# Raw candidates before threshold or NMS: one entry per (box, chunk) pair whose chunk score is above the
# detector's floor. `box` numbers boxes within the image (several entries may share one box);
# `chunk` indexes the row's `chunks` list, -1 for a box whose tokens map to no chunk. Corners are
# normalized xyxy in [0, 1] of the original image.
CANDIDATE_TYPE = pa.struct(
    [
        pa.field("box", pa.int32(), nullable=False),
        pa.field("chunk", pa.int32(), nullable=False),
        pa.field("x1", pa.float64(), nullable=False),
        pa.field("y1", pa.float64(), nullable=False),
        pa.field("x2", pa.float64(), nullable=False),
        pa.field("y2", pa.float64(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),  # this chunk's score for this box
        pa.field("box_score", pa.float32(), nullable=False),  # the box's best score over all tokens
    ]
)
DETECT_SCHEMA = pa.schema([KEY, pa.field("candidates", pa.list_(CANDIDATE_TYPE), nullable=False)])

# --- select --------------------------------------------------------------------------------------------
PAIR_TYPE = pa.struct(
    [
        pa.field("chunk", pa.int32(), nullable=False),
        pa.field("x1", pa.float64(), nullable=False),
        pa.field("y1", pa.float64(), nullable=False),
        pa.field("x2", pa.float64(), nullable=False),
        pa.field("y2", pa.float64(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
    ]
)
SELECT_SCHEMA = pa.schema([KEY, pa.field("pairs", pa.list_(PAIR_TYPE), nullable=False)])

# --- compose / final GRIT shards ----------------------------------------------------------------------
# As released in GRIT-20M: `noun_chunks` and `ref_exps` are lists of [start, end, x1, y1, x2, y2, score]
# (doubles; offsets end-exclusive; corners normalized), aligned 1:1. Passthrough columns of the source
# (`id`, `clip_similarity_vitb32`, ...) follow `GRIT_FIELDS`.
SPAN_BOX_LIST = pa.list_(pa.list_(pa.float64()))
GRIT_FIELDS = [
    KEY,
    pa.field("url", pa.string()),
    pa.field("caption", pa.string(), nullable=False),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("noun_chunks", SPAN_BOX_LIST, nullable=False),
    pa.field("ref_exps", SPAN_BOX_LIST, nullable=False),
    pa.field("grounded_caption", pa.string(), nullable=False),
    pa.field("markdown_caption", pa.string(), nullable=False),
]
GRIT_SCHEMA = pa.schema(GRIT_FIELDS)
GRIT_COLUMNS = tuple(f.name for f in GRIT_FIELDS)

STAGE_SCHEMAS = {
    "ingest": INGEST_SCHEMA,
    "chunks": CHUNKS_SCHEMA,
    "detect": DETECT_SCHEMA,
    "select": SELECT_SCHEMA,
    "compose": GRIT_SCHEMA,
}


def empty_rejects() -> pa.Table:
    return REJECT_SCHEMA.empty_table()
