"""Publishing a finished run as it is: the provenance every final shard carries in its Parquet key-value
metadata, and the dataset card (`<run>/grit/README.md`) in the Hugging Face Hub's form.

Where it sits: at the end of a run. The engine's publish step passes `shard_metadata(...)` to the Parquet
writer of every final `grit/shard-*.parquet` and writes `dataset_card(...)` next to them, so the `grit/`
folder can be uploaded to the Hub as a dataset repository and loaded with `datasets` unchanged. Pure
functions: they read no run directory and write nothing.

Shard metadata: one key-value entry, key `grit_pipeline` (`METADATA_KEY`), value UTF-8 JSON with sorted
keys and no whitespace::

    {"config": {"chunks": {...}, "compose": {...}, "detect": {...}, "ingest": {...}, "select": {...}},
     "format": 1,
     "pipeline_version": "0.1.0",
     "stages": [{"fingerprint": "6a2f1e0d06d38e1e", "name": "ingest", "version": 1}, ...]}

`stages` lists the stages that made the shard in pipeline order; `config` holds the semantic config (the
fingerprinted `Config` fields) of exactly those stages. The `run` section -- where and how the run went:
input location, Ray address, `run.resources`, CPUs, progress bars -- is never written, so the same input
and config give byte-identical shards on a laptop and on a cluster. `format` is bumped if this layout
changes. Read it back with `read_shard_metadata(path)`, or with pyarrow alone:
`json.loads(pq.read_metadata(path).metadata[b"grit_pipeline"])`.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from schemas.display import display_text

METADATA_KEY = b"grit_pipeline"
METADATA_FORMAT = 1
SHARD_PATTERN = "shard-*.parquet"  # final shard names, relative to the card (both live in <run>/grit/)
STAGE_RECORD_FIELDS = ("name", "version", "fingerprint")

# What the GRIT columns hold (README "Output schema"); other columns are passed through from the source.
COLUMN_MEANINGS = {
    "key": "row id: img2dataset's key, or a stable hash for other sources",
    "url": "image URL (or where the image was read from)",
    "caption": "the caption (whitespace collapsed); all offsets index it",
    "width": "image width in pixels",
    "height": "image height in pixels",
    "noun_chunks": "[start, end, x1, y1, x2, y2, score] per chunk-box pair: end-exclusive character offsets, "
                   "corners normalized to [0, 1], ordered by score",
    "ref_exps": "aligned 1:1 with noun_chunks: the chunk's referring expression with the same box",
    "grounded_caption": "Kosmos-2 form: <grounding> + caption with <phrase>...</phrase><object>"
                        "<patch_index_a><patch_index_b></object> (32x32 location grid)",
    "markdown_caption": "[a dog](<patch_index_0288><patch_index_0990>): the caption with Markdown links",
}
# Hub `size_categories` values, by upper bound of rows.
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))
DETECTOR_WEIGHTS = {  # backend -> the config fields that say which weights it ran
    "groundingdino": ("gd_checkpoint", "gd_config", "gd_text_encoder"),
    "hf": ("hf_model",),
    "replay": ("replay_mode", "replay_path"),
}
THRESHOLD_STAGES = ("select", "compose")
KOSMOS2_CITATION = """\
@article{peng2023kosmos2,
  title   = {Kosmos-2: Grounding Multimodal Large Language Models to the World},
  author  = {Peng, Zhiliang and Wang, Wenhui and Dong, Li and Hao, Yaru and Huang, Shaohan and Ma, Shuming
             and Wei, Furu},
  journal = {arXiv preprint arXiv:2306.14824},
  year    = {2023}
}"""


class ShardMetadataError(ValueError):
    """A shard without (or with unreadable) grit-pipeline metadata; the message names the file."""


# --- shard metadata -----------------------------------------------------------------------------------


def semantic_config(config: Mapping[str, Any], stage_names: Sequence[str]) -> dict[str, Any]:
    """The sections of `config` (a resolved pipeline config as a dict) that belong to `stage_names`, in that
    order; everything else (`run`, `fingerprints`) is left out."""
    missing = [name for name in stage_names if name not in config]
    if missing:
        raise ValueError(f"config has no section for stage(s) {', '.join(missing)}")
    return {name: config[name] for name in stage_names}


def shard_metadata(pipeline_version: str, stages: Sequence[Mapping[str, Any]],
                   config: Mapping[str, Any]) -> dict[bytes, bytes]:
    """Parquet key-value metadata for a final shard (layout in the module docstring): pass it to
    `pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), **md}), ...)` or to
    a `ParquetWriter`'s schema. `stages`: one {name, version, fingerprint} per stage, pipeline order;
    `config`: the resolved config as a dict (JSON values); only the listed stages' sections are kept."""
    records = []
    for i, stage in enumerate(stages):
        missing = [f for f in STAGE_RECORD_FIELDS if f not in stage]
        if missing:
            raise ValueError(f"stages[{i}] lacks {', '.join(missing)}; each stage needs name, version, fingerprint")
        records.append({f: stage[f] for f in STAGE_RECORD_FIELDS})
    doc = {
        "format": METADATA_FORMAT,
        "pipeline_version": pipeline_version,
        "stages": records,
        "config": semantic_config(config, [r["name"] for r in records]),
    }
    payload = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return {METADATA_KEY: payload.encode("utf-8")}


def read_shard_metadata(path_or_file: str | BinaryIO, filesystem: Any = None) -> dict[str, Any]:
    """The grit-pipeline metadata of a Parquet shard (reads the footer only). `path_or_file`: a local path
    or fsspec URL, or an open binary file; `filesystem`: a pyarrow or fsspec filesystem the path is on.
    Raises ShardMetadataError naming the file when the shard has none."""
    name = path_or_file if isinstance(path_or_file, str) else getattr(path_or_file, "name", "<file>")
    if isinstance(path_or_file, str) and filesystem is None:
        import fsspec

        fs, path = fsspec.core.url_to_fs(path_or_file)
        with fs.open(path, "rb") as f:
            metadata = pq.read_metadata(f).metadata or {}
    else:
        metadata = pq.read_metadata(path_or_file, filesystem=filesystem).metadata or {}
    if METADATA_KEY not in metadata:
        raise ShardMetadataError(f"{name}: no {METADATA_KEY.decode()!r} key in its Parquet key-value metadata "
                                 "(not a final shard of grit-pipeline, or written before shards carried it)")
    try:
        return json.loads(metadata[METADATA_KEY])
    except ValueError as e:
        raise ShardMetadataError(f"{name}: the {METADATA_KEY.decode()!r} metadata is not JSON: {e}") from None


# --- Hub features -------------------------------------------------------------------------------------


def _hub_type(arrow_type: pa.DataType, column: str) -> dict[str, Any]:
    """One Arrow type in the Hub card's feature syntax (what `datasets.Features._to_yaml_list` writes):
    `{dtype: string}`, `{list: float64}`, `{list: {list: float64}}`, `{struct: [{name, dtype}, ...]}`."""
    t = pa.types
    if t.is_dictionary(arrow_type):
        return _hub_type(arrow_type.value_type, column)
    if t.is_list(arrow_type) or t.is_large_list(arrow_type) or t.is_fixed_size_list(arrow_type):
        inner = _hub_type(arrow_type.value_type, column)
        # a list of a plain value or of a struct is written without the inner key, as datasets does
        value = inner.get("dtype", inner.get("struct", inner)) if len(inner) == 1 else inner
        out: dict[str, Any] = {"large_list" if t.is_large_list(arrow_type) else "list": value}
        if t.is_fixed_size_list(arrow_type):
            out["length"] = arrow_type.list_size
        return out
    if t.is_struct(arrow_type):
        return {"struct": [{"name": f.name, **_hub_type(f.type, column)} for f in arrow_type]}
    if t.is_map(arrow_type) or t.is_union(arrow_type):
        raise ValueError(f"column {column!r}: Arrow type {arrow_type} has no Hub feature equivalent")
    # Arrow's names where the Hub's differ; the rest (string, int32, bool, binary, timestamp[us], ...) agree
    aliases = {"double": "float64", "float": "float32", "halffloat": "float16", "date32[day]": "date32",
               "date64[ms]": "date64"}
    return {"dtype": aliases.get(str(arrow_type), str(arrow_type))}


def hub_features(schema: pa.Schema) -> list[dict[str, Any]]:
    """`dataset_info.features` of a dataset card for Parquet files with this schema."""
    return [{"name": field.name, **_hub_type(field.type, field.name)} for field in schema]


# --- the card -----------------------------------------------------------------------------------------


def _size_category(rows: int) -> str:
    return next((label for bound, label in SIZE_CATEGORIES if rows < bound), "n>1B")


def _data_files(shard_files: Sequence[str]) -> list[str]:
    """`configs[].data_files` paths relative to the card: the shard glob when every shard matches it (so
    shards added later are picked up), else the file names."""
    names = sorted(PurePosixPath(f).name for f in shard_files)
    if names and all(fnmatch.fnmatchcase(n, SHARD_PATTERN) for n in names):
        return [SHARD_PATTERN]
    return names


def _language(config: Mapping[str, Any]) -> list[str]:
    """The captions' language, from the spaCy pipeline that chunked them (`en_core_web_sm` -> en)."""
    model = str((config.get("chunks") or {}).get("model") or "")
    code = model.split("_", 1)[0]
    return [code] if re.fullmatch(r"[a-z]{2,3}", code) and code != "xx" else []


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|#])")


def _cell(value: Any) -> str:
    """A value as Markdown table cell text: JSON for non-strings, control, bidi and Markdown characters escaped."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return _MARKDOWN_SPECIAL.sub(r"\\\1", display_text(text))


def _code_block(text: str, lang: str = "") -> str:
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    body = display_text(text, keep="\n\t")  # lines and tabs kept; other control and bidi characters escaped
    return f"{fence}{lang}\n{body}\n{fence}"


def _settings_table(section: Mapping[str, Any], keys: Sequence[str] | None = None) -> list[str]:
    lines = ["| setting | value |", "|---|---|"]
    for key in keys if keys is not None else list(section):
        lines.append(f"| {_cell(key)} | {_cell(section.get(key))} |")
    return lines


def _header(*, rows: int, num_bytes: int, config: Mapping[str, Any], schema: pa.Schema,
            shard_files: Sequence[str]) -> str:
    meta: dict[str, Any] = {}
    language = _language(config)
    if language:
        meta["language"] = language
    meta.update({
        "pretty_name": "GrIT (grit-pipeline)",
        "size_categories": [_size_category(rows)],
        "task_categories": ["image-to-text", "object-detection"],
        "tags": ["grounding", "phrase-grounding", "referring-expressions", "kosmos-2", "grit"],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": "train", "path": p} for p in _data_files(shard_files)]}],
        # the block the Hub's card format (and `datasets`) expects in full: each split's name, bytes and rows,
        # then the sizes of the whole (one split: the same bytes, which are also what a download fetches)
        "dataset_info": {"features": hub_features(schema),
                         "splits": [{"name": "train", "num_bytes": num_bytes, "num_examples": rows}],
                         "download_size": num_bytes,
                         "dataset_size": num_bytes},
    })
    licence = ("# LICENSE: fill this in before publishing -- a Hub licence id (e.g. cc-by-4.0), or `other`\n"
               "# with `license_name` and `license_link`. The rows hold the source corpus's captions and image\n"
               "# URLs, so its terms apply (LAION, COYO, ... each have their own); see \"Licence\" below.\n"
               "license:\n")
    return "---\n" + licence + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000) + "---\n"


def dataset_card(*, summary: Mapping[str, Any], config: Mapping[str, Any], fingerprints: Mapping[str, str],
                 schema: pa.Schema, command: str, shard_files: Sequence[str], num_bytes: int,
                 pipeline_version: str) -> str:
    """The text of `<run>/grit/README.md`: a Hub dataset card (YAML header: licence placeholder, language,
    size, task categories and tags, `configs` with data files relative to the card, `dataset_info` with the
    features from `schema` and the `train` split's `num_examples` and `num_bytes`, `download_size`,
    `dataset_size`) and a body with the funnel (`summary`, as `report/summary.json`), the thresholds, the
    detector, the stage fingerprints and `command`. `config` is the resolved pipeline config as a dict;
    `shard_files` the final shards (paths or names; the card lives in their folder); `num_bytes` their
    total size in bytes -- the Parquet files as stored, which is what a listing of the folder gives without
    opening any (`datasets` records its own in-memory size when it loads them, and checks only the rows).
    Deterministic: nothing run-specific but the inputs (no timings, no dates)."""
    stages = summary.get("stages", {})
    funnel = summary.get("funnel", [])
    final = next((stages[s] for s in ("publish", "compose") if s in stages), None)  # publish: after duplicate keys
    rows = int(final["rows_out"]) if final else int(funnel[-1]["rows_out"] if funnel else 0)
    stage_names = [s for s in fingerprints if s in config]
    lines = [_header(rows=rows, num_bytes=num_bytes, config=config, schema=schema, shard_files=shard_files)]

    lines += [
        f"# GrIT shards built with grit-pipeline {_cell(pipeline_version)}",
        "",
        "Grounded image-text pairs in the layout of GRIT-20M, the corpus of Kosmos-2 (Peng et al., 2023): each "
        "caption's noun chunks and referring expressions with their boxes, and the caption in Kosmos-2's "
        f"grounded form with location tokens. {rows:,} rows in {len(shard_files):,} shard(s).",
        "",
        "## Loading",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'ds = load_dataset("parquet", data_files="{SHARD_PATTERN}", split="train")  # from this folder',
        'ds = load_dataset("<user>/<dataset>", split="train")  # once this folder is pushed to the Hub',
        "```",
        "",
        "## Columns",
        "",
        "| column | type | meaning |",
        "|---|---|---|",
    ]
    for field in schema:
        meaning = COLUMN_MEANINGS.get(field.name, "passed through from the source")
        lines.append(f"| {_cell(field.name)} | {_cell(str(field.type))} | {_cell(meaning)} |")

    lines += ["", "## Funnel", "",
              "Rows each stage received and kept; every dropped row has a reason (a reject file per shard in the "
              "run directory).", "",
              "| stage | shards | rows in | rows out | kept of input | rejects |", "|---|---|---|---|---|---|"]
    for row in funnel:
        s = stages.get(row["stage"], {})
        rejects = ", ".join(f"{_cell(k)} {v:,}" for k, v in sorted(s.get("rejects", {}).items())) or "-"
        lines.append(f"| {_cell(row['stage'])} | {s.get('shards', '-')} | {row['rows_in']:,} | {row['rows_out']:,} "
                     f"| {row['kept_of_input']:.1%} | {rejects} |")

    lines += ["", "## Thresholds", ""]
    for name in THRESHOLD_STAGES:
        if name in config:
            lines += [f"`{name}`:", "", *_settings_table(config[name]), ""]

    detect = config.get("detect") or {}
    backend = detect.get("backend")
    weights = DETECTOR_WEIGHTS.get(str(backend), ())
    lines += ["## Detector", "", f"Backend `{_cell(backend)}`; the weights it ran and its settings:", "",
              *_settings_table(detect, ["backend", *weights, *[k for k in detect if k not in ("backend", *weights)]]),
              ""]

    lines += ["## How it was made", "", "Command:", "", _code_block(command, "bash"), "",
              "Stage fingerprints (a stage's name, version and semantic config, chained on the stage before it):",
              "", "| stage | fingerprint |", "|---|---|"]
    lines += [f"| {_cell(name)} | {_cell(fp)} |" for name, fp in fingerprints.items()]
    lines += [
        "",
        f"Every shard's Parquet key-value metadata holds, under the key `{METADATA_KEY.decode()}`, the pipeline "
        "version, each stage's name, version and fingerprint, and the semantic config of each stage (below). "
        "The run's execution settings (`run`: input location, cluster, resources, CPUs) are not recorded there, "
        "so the same input and config give byte-identical shards wherever they run:",
        "",
        "```python",
        "import json, pyarrow.parquet as pq",
        f'meta = json.loads(pq.read_metadata("shard-00000.parquet").metadata[{METADATA_KEY!r}])',
        "```",
        "",
        "Semantic config of every stage:",
        "",
        _code_block(yaml.safe_dump(semantic_config(config, stage_names), sort_keys=False, allow_unicode=True)
                    .rstrip(), "yaml"),
        "",
        "## Licence",
        "",
        "Fill in `license:` in the header before publishing. These rows hold the captions and image URLs of the "
        "source corpus, whose terms apply (the images themselves are not included); the boxes and grounded "
        "captions were computed by the detector and settings above.",
        "",
        "## Citation",
        "",
        "The GrIT construction follows Kosmos-2:",
        "",
        "```bibtex",
        KOSMOS2_CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)
