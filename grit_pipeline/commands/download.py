"""`grit download`: fetch LAION / COYO / GRIT-20M url lists into img2dataset webdataset shards.

This sits before the pipeline: its output folder (`00000.tar` + `00000.parquet` + `00000_stats.json` per
shard, img2dataset's standard layout) is what the `ingest` stage reads directly. Every input row ends up
in its shard's Parquet with img2dataset's `status` (`success`, `failed_to_download`, `failed_to_resize`)
and `error_message`; only successes have members (`<key>.jpg/.txt/.json`) in the tar.

img2dataset itself never re-fetches single rows of a finished shard, so `retry_failed` does it:

1. collect the rows whose status is not `success` from every shard's Parquet (their url, caption and
   passthrough columns are all there), tagging each with its original key and shard;
2. run img2dataset on that subset into a scratch folder (`<output>/_grit_retry/`);
3. merge each touched shard: the retried rows replace the old ones in place (same key, same shard id,
   latest status), the new images join the tar under the original key, and the shard's tar, Parquet and
   stats are rewritten to temporary names and renamed over the originals.

The merge is idempotent: the tar is rebuilt to hold exactly the `success` rows of the merged Parquet, so a
crash between the renames is repaired by running `--retry-failed` again.

img2dataset starts worker processes with the `spawn` method, which re-imports the caller's `__main__`;
we therefore run it in a child interpreter (`python -c`, which has no main file to re-import), so it works
from the `grit` CLI, a notebook or an unguarded user script alike.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import typer
import yaml
from pydantic import BaseModel, ConfigDict, Field

from grit_pipeline.errors import UserError, reading
from schemas.display import display_text

log = logging.getLogger(__name__)

MANIFEST_NAME = "grit_download.yaml"  # not *.json: img2dataset reads every top-level *.json as shard stats
RETRY_DIR = "_grit_retry"
RETRY_KEY_COL = "grit_retry_key"
RETRY_SHARD_COL = "grit_retry_shard"
SUCCESS = "success"

# Columns img2dataset writes itself and refuses as `save_additional_columns`.
IMG2DATASET_COLUMNS = (
    "key", "caption", "url", "width", "height", "original_width", "original_height", "status",
    "error_message", "exif", "md5", "sha256", "sha512",
)
# Column names of the url lists we know, first match wins: LAION-400M/5B (`URL`, `TEXT`), COYO-700M
# (`url`, `text`), GRIT-20M and img2dataset-style lists (`url`, `caption`).
URL_COLUMN_CANDIDATES = ("url", "URL")
CAPTION_COLUMN_CANDIDATES = ("caption", "TEXT", "text", "CAPTION")

_SHARD_PARQUET = re.compile(r"^(\d+)\.parquet$")

# Run in a child interpreter; see the module docstring.
_IMG2DATASET_RUNNER = (
    "import json, sys\n"
    "from img2dataset import download\n"
    "download(**json.loads(sys.argv[1]))\n"
)


# img2dataset's url list formats and resize modes (`img2dataset.reader.Reader`, `img2dataset.resizer.ResizeMode`).
InputFormat = Literal["parquet", "csv", "csv.gz", "tsv", "tsv.gz", "json", "json.gz", "jsonl", "jsonl.gz", "txt",
                      "txt.gz"]
ResizeMode = Literal["keep_ratio", "keep_ratio_largest", "center_crop", "border", "no"]


class DownloadError(RuntimeError):
    """img2dataset failed, or the url list / output folder is not usable (`BadUrlList`)."""


class BadUrlList(UserError, DownloadError):
    """The url list or the output folder given is not usable: an input error (exit 2), nothing downloaded."""


class DownloadOptions(BaseModel):
    """img2dataset settings `grit download` exposes. Stored in the output folder so a retry reuses them."""

    model_config = ConfigDict(extra="forbid")

    url_col: str | None = None  # None: the first of URL_COLUMN_CANDIDATES present in the list
    caption_col: str | None = None  # None: the first of CAPTION_COLUMN_CANDIDATES present
    keep_columns: list[str] | None = None  # passthrough columns; None: every column img2dataset allows
    input_format: InputFormat = "parquet"
    # Short side 800 px is GroundingDINO's own input size: the detector loses nothing, storage stays modest.
    image_size: int = Field(800, gt=0)
    resize_mode: ResizeMode = "keep_ratio"
    resize_only_if_bigger: bool = True
    encode_quality: int = Field(95, ge=1, le=100)
    rows_per_shard: int = Field(10_000, gt=0)
    processes: int = Field(1, gt=0)
    threads: int = Field(64, gt=0)
    timeout: int = Field(10, gt=0)  # seconds per request (img2dataset takes whole seconds)
    retries: int = Field(0, ge=0)  # immediate re-tries per url inside img2dataset
    user_agent_token: str | None = "grit-pipeline"
    # img2dataset's default: honour X-Robots-Tag opt-outs (noai, noimageai, noindex, noimageindex).
    disallowed_header_directives: list[str] | None = None


@dataclass
class DownloadSummary:
    """What an output folder holds, from its shards' Parquet metadata."""

    output: str
    shards: list[str] = field(default_factory=list)
    rows: int = 0
    successes: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # status -> rows
    errors: dict[str, int] = field(default_factory=dict)  # error_message -> rows (most common first)
    retried: int = 0  # rows re-fetched by this call (retry only)
    recovered: int = 0  # of those, rows that are now `success`

    @property
    def failed(self) -> int:
        return sum(self.failures.values())


# --- column resolution ---------------------------------------------------------------------------------


def _first_url_list_file(fs: fsspec.AbstractFileSystem, path: str, input_format: str) -> str:
    if fs.isdir(path):
        files = sorted(fs.glob(path.rstrip("/") + "/*." + input_format))
        if not files:
            raise BadUrlList(f"{path}: no *.{input_format} url list in this folder")
        return files[0]
    if not fs.exists(path):
        raise BadUrlList(f"{path}: url list not found")
    return path


def resolve_columns(url_list: str, options: DownloadOptions) -> tuple[str, str | None, list[str]]:
    """(url column, caption column, passthrough columns) of a url list, from its first file's schema."""
    fs, path = fsspec.core.url_to_fs(url_list)
    first = _first_url_list_file(fs, path, options.input_format)
    if options.input_format != "parquet":
        if options.url_col is None:
            raise BadUrlList(f"{first}: give --url-col for {options.input_format} url lists")
        return options.url_col, options.caption_col, list(options.keep_columns or [])
    with fs.open(first, "rb") as f, reading(first, "Parquet url list"):
        names = pq.read_schema(f).names

    def pick(given: str | None, candidates: tuple[str, ...], what: str) -> str | None:
        if given is not None:
            if given not in names:
                raise BadUrlList(f"{first}: no {what} column {given!r}; columns are {names}")
            return given
        return next((c for c in candidates if c in names), None)

    url_col = pick(options.url_col, URL_COLUMN_CANDIDATES, "url")
    if url_col is None:
        raise BadUrlList(f"{first}: no url column (looked for {URL_COLUMN_CANDIDATES}); give --url-col")
    caption_col = pick(options.caption_col, CAPTION_COLUMN_CANDIDATES, "caption")
    if caption_col is None:
        log.warning("%s: no caption column (looked for %s); rows get no caption", first, CAPTION_COLUMN_CANDIDATES)

    if options.keep_columns is not None:
        missing = [c for c in options.keep_columns if c not in names]
        if missing:
            raise BadUrlList(f"{first}: passthrough columns {missing} not in the url list; columns are {names}")
        clash = [c for c in options.keep_columns if c in IMG2DATASET_COLUMNS]
        if clash:
            raise BadUrlList(f"passthrough columns {clash} are written by img2dataset itself; drop them")
        keep = list(options.keep_columns)
    else:
        keep = [c for c in names if c not in (url_col, caption_col) and c not in IMG2DATASET_COLUMNS]
        skipped = [c for c in names if c not in (url_col, caption_col) and c in IMG2DATASET_COLUMNS]
        if skipped:
            log.info("%s: not passed through (img2dataset writes its own): %s", first, skipped)
    return url_col, caption_col, keep


# --- running img2dataset -------------------------------------------------------------------------------


def _img2dataset_kwargs(url_list: str, output: str, options: DownloadOptions, url_col: str,
                        caption_col: str | None, keep: list[str], incremental_mode: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        url_list=url_list,
        output_folder=output,
        output_format="webdataset",
        input_format=options.input_format,
        url_col=url_col,
        caption_col=caption_col,
        save_additional_columns=keep or None,
        image_size=options.image_size,
        resize_mode=options.resize_mode,
        resize_only_if_bigger=options.resize_only_if_bigger,
        encode_quality=options.encode_quality,
        number_sample_per_shard=options.rows_per_shard,
        processes_count=options.processes,
        thread_count=options.threads,
        timeout=options.timeout,
        retries=options.retries,
        user_agent_token=options.user_agent_token,
        incremental_mode=incremental_mode,
        distributor="multiprocessing",
        enable_wandb=False,
    )
    if options.disallowed_header_directives is not None:
        kwargs["disallowed_header_directives"] = options.disallowed_header_directives
    return kwargs


def run_img2dataset(kwargs: dict[str, Any], echo: bool = False) -> None:
    """Run `img2dataset.download(**kwargs)` in a child interpreter; raise DownloadError if it fails.
    Its progress lines go to stderr with `echo`, else to the debug log."""
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", WANDB_SILENT="true")
    tail: deque[str] = deque(maxlen=20)
    with subprocess.Popen(  # noqa: S603 - our own interpreter, fixed program text, JSON arguments
        [sys.executable, "-c", _IMG2DATASET_RUNNER, json.dumps(kwargs)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if not line:
                continue
            tail.append(line)
            if echo:
                print(line, file=sys.stderr, flush=True)
            else:
                log.debug("img2dataset: %s", line)
    if proc.returncode != 0:
        raise DownloadError(f"img2dataset exited with {proc.returncode} writing {kwargs['output_folder']}:\n"
                            + "\n".join(tail))


# --- reading an output folder ---------------------------------------------------------------------------


def shard_names(output: str) -> list[str]:
    """Shard ids (`00000`, ...) of an img2dataset output folder, sorted."""
    fs, path = fsspec.core.url_to_fs(output)
    names = []
    for p in fs.glob(path.rstrip("/") + "/*.parquet"):
        m = _SHARD_PARQUET.match(PurePosixPath(p).name)
        if m:
            names.append(m.group(1))
    return sorted(names)


def summarize(output: str) -> DownloadSummary:
    """Rows, successes and failures by status over every shard of `output`."""
    fs, path = fsspec.core.url_to_fs(output)
    summary = DownloadSummary(output=output, shards=shard_names(output))
    failures: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for name in summary.shards:
        with fs.open(f"{path}/{name}.parquet", "rb") as f:
            t = pq.read_table(f, columns=["status", "error_message"])
        summary.rows += t.num_rows
        for status, err in zip(t.column("status").to_pylist(), t.column("error_message").to_pylist(), strict=True):
            if status == SUCCESS:
                summary.successes += 1
            else:
                failures[status or "unknown"] += 1
                errors[err or ""] += 1
    summary.failures = dict(sorted(failures.items()))
    summary.errors = dict(errors.most_common())
    return summary


def _write_manifest(fs: fsspec.AbstractFileSystem, path: str, manifest: dict[str, Any]) -> None:
    with fs.open(f"{path}/{MANIFEST_NAME}", "w") as f:
        yaml.safe_dump(manifest, f, sort_keys=True)


def read_manifest(output: str) -> dict[str, Any] | None:
    fs, path = fsspec.core.url_to_fs(output)
    if not fs.exists(f"{path}/{MANIFEST_NAME}"):
        return None
    where = f"{output}/{MANIFEST_NAME}"
    with fs.open(f"{path}/{MANIFEST_NAME}", "r") as f, \
            reading(where, "download manifest", yaml.YAMLError, ValueError):
        manifest = yaml.safe_load(f)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("options"), dict):
        raise BadUrlList(f"{where}: not a grit download manifest (no `options` mapping)")
    return manifest


# --- download ------------------------------------------------------------------------------------------


def download(url_list: str, output: str, options: DownloadOptions | None = None, *,
             echo: bool = False) -> DownloadSummary:
    """Download `url_list` (a Parquet file or a folder of them) into webdataset shards under `output`.

    Shards already finished in `output` are skipped (img2dataset's incremental mode), so an interrupted
    download resumes by running the same command again.
    """
    options = options or DownloadOptions()
    url_col, caption_col, keep = resolve_columns(url_list, options)
    fs, path = fsspec.core.url_to_fs(output)
    fs.makedirs(path, exist_ok=True)
    _write_manifest(fs, path, {
        "url_list": url_list,
        "url_col": url_col,
        "caption_col": caption_col,
        "keep_columns": keep,
        "options": options.model_dump(),
    })
    run_img2dataset(_img2dataset_kwargs(url_list, output, options, url_col, caption_col, keep, "incremental"),
                    echo=echo)
    return summarize(output)


# --- retry of failed rows ------------------------------------------------------------------------------


def _passthrough_of(schema: pa.Schema) -> list[str]:
    return [n for n in schema.names if n not in IMG2DATASET_COLUMNS]


def _collect_failed(fs: fsspec.AbstractFileSystem, path: str, shards: list[str]) -> pa.Table | None:
    """Rows of every shard whose status is not `success`, as a url list with their key and shard."""
    parts = []
    for name in shards:
        with fs.open(f"{path}/{name}.parquet", "rb") as f:
            t = pq.read_table(f)
        failed = t.filter(pc.not_equal(t.column("status"), SUCCESS))
        failed = failed.filter(pc.invert(pc.is_null(failed.column("url"))))
        if failed.num_rows == 0:
            continue
        cols = ["url"] + (["caption"] if "caption" in t.column_names else []) + _passthrough_of(t.schema)
        part = failed.select(cols)
        part = part.append_column(RETRY_KEY_COL, failed.column("key"))
        part = part.append_column(RETRY_SHARD_COL, pa.array([name] * failed.num_rows, pa.string()))
        parts.append(part)
    if not parts:
        return None
    return pa.concat_tables(parts, promote_options="default")


def _tar_samples(fs: fsspec.AbstractFileSystem, tar_path: str) -> dict[str, list[tuple[tarfile.TarInfo, bytes]]]:
    """key -> [(member info, bytes)] of one webdataset tar (members named `<key>.<ext>`)."""
    samples: dict[str, list[tuple[tarfile.TarInfo, bytes]]] = {}
    if not fs.exists(tar_path):
        return samples
    with fs.open(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key = info.name.split("/")[-1].split(".", 1)[0]
            data = tar.extractfile(info).read()  # type: ignore[union-attr]
            samples.setdefault(key, []).append((info, data))
    return samples


def _rekey_member(info: tarfile.TarInfo, data: bytes, old_key: str, new_key: str) -> tuple[tarfile.TarInfo, bytes]:
    ext = info.name.split("/")[-1].split(".", 1)[1]
    if ext == "json":
        meta = json.loads(data)
        meta["key"] = new_key
        meta.pop(RETRY_KEY_COL, None)
        meta.pop(RETRY_SHARD_COL, None)
        data = json.dumps(meta, indent=4).encode()
    new = tarfile.TarInfo(f"{new_key}.{ext}")
    new.size = len(data)
    new.mtime = info.mtime
    new.mode = info.mode
    return new, data


def _write_tar(fs: fsspec.AbstractFileSystem, tar_path: str,
               samples: dict[str, list[tuple[tarfile.TarInfo, bytes]]]) -> None:
    with fs.open(tar_path, "wb") as f, tarfile.open(fileobj=f, mode="w:") as tar:
        for key in sorted(samples):
            for info, data in sorted(samples[key], key=lambda m: m[0].name):
                tar.addfile(info, io.BytesIO(data))


def _shard_stats(table: pa.Table, previous: dict[str, Any]) -> dict[str, Any]:
    statuses = table.column("status").to_pylist()
    errors = table.column("error_message").to_pylist()
    status_dict: Counter[str] = Counter()
    for s, e in zip(statuses, errors, strict=True):
        status_dict[SUCCESS if s == SUCCESS else (e or s or "unknown")] += 1
    return {
        **previous,
        "count": len(statuses),
        "successes": statuses.count(SUCCESS),
        "failed_to_download": statuses.count("failed_to_download"),
        "failed_to_resize": statuses.count("failed_to_resize"),
        "status_dict": dict(sorted(status_dict.items())),
    }


def _merge_shard(fs: fsspec.AbstractFileSystem, path: str, name: str, retried: pa.Table,
                 fetched: dict[str, list[tuple[tarfile.TarInfo, bytes]]]) -> int:
    """Fold one shard's retried rows (`retried`, keyed by RETRY_KEY_COL) and their fetched tar samples
    (keyed by img2dataset's scratch key) into the shard. Returns how many rows are now successes."""
    with fs.open(f"{path}/{name}.parquet", "rb") as f:
        original = pq.read_table(f)
    schema = original.schema
    replacement: dict[str, dict[str, Any]] = {}
    scratch_key: dict[str, str] = {}
    for row in retried.to_pylist():
        orig_key = row.pop(RETRY_KEY_COL)
        row.pop(RETRY_SHARD_COL, None)
        scratch_key[orig_key] = row["key"]
        row["key"] = orig_key
        replacement[orig_key] = {n: row.get(n) for n in schema.names}
    rows = [replacement.get(r["key"], r) for r in original.to_pylist()]
    merged = pa.Table.from_pylist(rows, schema=schema)

    success_keys = {r["key"] for r in rows if r["status"] == SUCCESS}
    samples = {k: v for k, v in _tar_samples(fs, f"{path}/{name}.tar").items() if k in success_keys}
    recovered = 0
    for orig_key, row in replacement.items():
        if row["status"] != SUCCESS:
            continue
        members = fetched.get(scratch_key[orig_key])
        if not members:
            raise DownloadError(f"{path}/{RETRY_DIR}: image of retried key {orig_key} (shard {name}) missing "
                                "from the scratch tar; run --retry-failed again")
        samples[orig_key] = [_rekey_member(i, d, scratch_key[orig_key], orig_key) for i, d in members]
        recovered += 1

    stats_path = f"{path}/{name}_stats.json"
    previous = {}
    if fs.exists(stats_path):
        with fs.open(stats_path, "r") as f:
            previous = json.load(f)

    # Temporary names first, then renames: tar, Parquet, stats. See the module docstring for why a crash
    # between the renames is harmless.
    tmp = ".grit-retry-tmp"
    _write_tar(fs, f"{path}/{name}.tar{tmp}", samples)
    with fs.open(f"{path}/{name}.parquet{tmp}", "wb") as f:
        pq.write_table(merged, f)
    with fs.open(f"{stats_path}{tmp}", "w") as f:
        json.dump(_shard_stats(merged, previous), f, indent=4)
    for target in (f"{path}/{name}.tar", f"{path}/{name}.parquet", stats_path):
        fs.mv(target + tmp, target)
    return recovered


def retry_failed(output: str, options: DownloadOptions | None = None, *, echo: bool = False) -> DownloadSummary:
    """Re-fetch only the rows of `output` whose status is not `success`, into their original shards and keys.

    `options` defaults to the ones the folder was downloaded with (read from its manifest); its timeout,
    retries and threads may be changed for the retry, image settings should stay as they were.
    """
    fs, path = fsspec.core.url_to_fs(output)
    shards = shard_names(output)
    if not shards:
        raise BadUrlList(f"{output}: no img2dataset shards (NNNNN.parquet) to retry")
    if options is None:
        manifest = read_manifest(output)
        options = DownloadOptions(**manifest["options"]) if manifest else DownloadOptions()
    failed = _collect_failed(fs, path, shards)
    if failed is None:
        summary = summarize(output)
        return summary

    scratch = f"{path}/{RETRY_DIR}"
    if fs.exists(scratch):
        fs.rm(scratch, recursive=True)
    fs.makedirs(f"{scratch}/out", exist_ok=True)
    with fs.open(f"{scratch}/input.parquet", "wb") as f:
        pq.write_table(failed, f)
    keep = [c for c in failed.column_names if c not in ("url", "caption")]
    caption_col = "caption" if "caption" in failed.column_names else None
    scratch_options = options.model_copy(update={"input_format": "parquet"})
    run_img2dataset(_img2dataset_kwargs(f"{scratch}/input.parquet", f"{scratch}/out", scratch_options, "url",
                                        caption_col, keep, "incremental"), echo=echo)

    # The scratch run's rows and images, grouped by the original shard they belong to.
    retried_parts = []
    fetched: dict[str, list[tuple[tarfile.TarInfo, bytes]]] = {}
    for scratch_name in shard_names(f"{scratch}/out"):
        with fs.open(f"{scratch}/out/{scratch_name}.parquet", "rb") as f:
            retried_parts.append(pq.read_table(f))
        fetched.update(_tar_samples(fs, f"{scratch}/out/{scratch_name}.tar"))
    if not retried_parts:
        raise DownloadError(f"{scratch}/out: img2dataset wrote no shard for the {failed.num_rows} retried rows")
    retried = pa.concat_tables(retried_parts, promote_options="default")

    recovered = 0
    shard_col = retried.column(RETRY_SHARD_COL)
    for name in sorted(set(shard_col.to_pylist())):
        rows = retried.filter(pc.equal(shard_col, name))
        recovered += _merge_shard(fs, path, name, rows, fetched)
    fs.rm(scratch, recursive=True)

    summary = summarize(output)
    summary.retried = retried.num_rows
    summary.recovered = recovered
    return summary


# --- CLI -----------------------------------------------------------------------------------------------


def download_command(
    paths: Annotated[list[str], typer.Argument(
        metavar="[URL_LIST] OUTPUT", help="url list (Parquet file or folder) and output folder; with "
                                          "--retry-failed only the output folder.")],
    retry: Annotated[bool, typer.Option("--retry-failed", help="Re-fetch only the rows whose status is not "
                                                               "success, in place.")] = False,
    url_col: Annotated[str | None, typer.Option("--url-col", help="url column (default: url or URL).")] = None,
    caption_col: Annotated[str | None, typer.Option(
        "--caption-col", help="caption column (default: caption, TEXT or text).")] = None,
    keep: Annotated[str | None, typer.Option("--keep", help="Comma-separated passthrough columns (default: all)."
                                             )] = None,
    input_format: Annotated[InputFormat, typer.Option("--input-format", help="url list format.")] = "parquet",
    image_size: Annotated[int | None, typer.Option(
        "--image-size", min=1, help="Resize target in px (default 800, short side).")] = None,
    resize_mode: Annotated[ResizeMode | None, typer.Option(
        "--resize-mode", help="img2dataset resize mode (default keep_ratio).")] = None,
    rows_per_shard: Annotated[int | None, typer.Option("--rows-per-shard", min=1,
                                                       help="Rows per shard (default 10000).")] = None,
    processes: Annotated[int | None, typer.Option("--processes", min=1, help="Download processes (default 1)."
                                                  )] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1,
                                                help="Download threads per process (default 64).")] = None,
    timeout: Annotated[int | None, typer.Option("--timeout", min=1, help="Seconds per request (default 10).")
                       ] = None,
    retries: Annotated[int | None, typer.Option("--retries", min=0,
                                                help="Immediate re-tries per url (default 0).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON instead of a table.")
                       ] = False,
) -> None:
    """Download image-caption url lists (LAION, COYO, GRIT-20M) into webdataset shards for `grit run`."""
    from rich.console import Console
    from rich.table import Table

    from grit_pipeline.logs import basic_config  # escapes control characters in log lines

    basic_config(level=logging.INFO, format="%(levelname)s %(message)s")
    given = {k: v for k, v in dict(
        url_col=url_col, caption_col=caption_col, image_size=image_size, resize_mode=resize_mode,
        rows_per_shard=rows_per_shard, processes=processes, threads=threads, timeout=timeout,
        retries=retries).items() if v is not None}
    if keep is not None:
        given["keep_columns"] = [c.strip() for c in keep.split(",") if c.strip()]
    try:
        if retry:
            if len(paths) != 1:
                raise typer.BadParameter("with --retry-failed give only the output folder")
            output = paths[0]
            manifest = read_manifest(output)
            base = manifest["options"] if manifest else {}
            summary = retry_failed(output, DownloadOptions(**{**base, **given}), echo=True)
        else:
            if len(paths) != 2:
                raise typer.BadParameter("give URL_LIST and OUTPUT")
            summary = download(paths[0], paths[1], DownloadOptions(input_format=input_format, **given),
                               echo=True)
    except BadUrlList:
        raise  # an input error: `grit` shows it and exits 2
    except DownloadError as e:  # img2dataset failed
        message = display_text(e, keep="\n")  # img2dataset's log tail keeps its lines
        typer.secho(f"error: {message}", fg="red", err=True)
        raise typer.Exit(1) from e

    if as_json:
        typer.echo(json.dumps({**asdict(summary), "failed": summary.failed}, indent=1))
        return
    console = Console()
    table = Table(title=f"{summary.output}: {len(summary.shards)} shard(s)")
    table.add_column("status")
    table.add_column("rows", justify="right")
    table.add_row(SUCCESS, str(summary.successes))
    for status, n in summary.failures.items():
        table.add_row(status, str(n))
    console.print(table)
    for err, n in list(summary.errors.items())[:5]:
        console.print(f"  {n:>6}  {err[:100]}")
    if retry:
        console.print(f"retried {summary.retried} row(s), {summary.recovered} now downloaded")
    if summary.failed:
        console.print(f"run `grit download --retry-failed {summary.output}` to re-fetch the failed rows")


def register(app: typer.Typer) -> None:
    """Add the `download` command to the `grit` typer app."""
    app.command("download")(download_command)
