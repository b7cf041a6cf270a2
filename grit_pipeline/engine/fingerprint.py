"""Stage fingerprints: the cache keys of the run directory (`stages/<stage>/<fingerprint>/`).

fingerprint = sha256(stage name, stage version, canonical JSON of the stage's semantic config, upstream
fingerprint), cut to 16 hex digits. Each stage chains on the one before it, so changing
`select.min_score` changes the fingerprints of `select` and `compose` and nothing upstream: ingest,
chunks and detect outputs are reused. The chain starts from the source's identity (its normalized
location and `run.limit`), so another input never reuses a cached ingest.

What is hashed is exactly a stage's `Config`: execution knobs live in its `Execution`
(`run.resources.<stage>`) and are never part of a fingerprint, so `run.resources.detect.batch_size=16`
reuses the GPU outputs already computed.

Fields marked `FileInput` (weights, a replay file, a model folder) are hashed by what they point to, not
by how the path was typed: the normalized location (an absolute, symlink-resolved local path, or the
URL) plus size and modification time (local) or etag (object stores), over every file of a folder.
`demo/x.parquet`, `./demo/x.parquet` and `/abs/demo/x.parquet` give one fingerprint; rewriting the file
gives another. A value that names no existing file (a hub id such as `bert-base-uncased`, a spaCy
package name) is hashed as written.
"""

from __future__ import annotations

import hashlib
import json
import os
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from grit_pipeline.errors import BadInput
from stages.base import FileInput

FINGERPRINT_LEN = 16
MAX_FOLDER_FILES = 10_000  # a FileInput folder with more files than this is an error (not a model folder)


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace; NaN/inf are refused so equal configs hash equally."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()[:FINGERPRINT_LEN]


def file_input_fields(model: type[BaseModel]) -> tuple[str, ...]:
    """Names of the fields of `model` annotated with `FileInput`."""
    out = []
    for name, info in model.model_fields.items():
        marks = list(info.metadata)
        annotation = info.annotation
        if typing.get_origin(annotation) is typing.Annotated:
            marks += list(typing.get_args(annotation)[1:])
        if any(isinstance(m, FileInput) for m in marks):
            out.append(name)
    return tuple(out)


def is_url(value: str) -> bool:
    return "://" in value or "::" in value


def normalize_uri(uri: str) -> str:
    """Local paths become absolute and symlink-resolved, so `data/in`, `./data/in/` and a link to it name
    the same source; URLs lose a trailing slash."""
    if is_url(uri):
        return uri.rstrip("/")
    return os.path.realpath(os.path.expanduser(uri)).rstrip("/") or "/"


def file_identity(value: str | None) -> Any:
    """What a FileInput value points to: location + size + mtime/etag per file (a folder: every file
    under it), or the value itself when it names nothing that exists (a hub id, a package name)."""
    if value is None:
        return None
    import fsspec

    location = normalize_uri(value)
    try:
        fs, path = fsspec.core.url_to_fs(location)
        if not fs.exists(path):
            return {"name": value}
        if fs.isdir(path):
            found = fs.find(path, detail=True)
            if len(found) > MAX_FOLDER_FILES:
                raise BadInput(f"{value}: a folder of {len(found)} files; point at the model folder itself")
            files = {posixpath_rel(p, path): _stamp(info) for p, info in sorted(found.items())}
            return {"location": location, "files": files}
        return {"location": location, **_stamp(fs.info(path))}
    except (OSError, ImportError) as e:  # unreachable store, missing protocol: hash the spelling
        return {"name": value, "unresolved": type(e).__name__}


def posixpath_rel(path: str, root: str) -> str:
    return path[len(root):].lstrip("/")


def _stamp(info: Mapping[str, Any]) -> dict[str, Any]:
    stamp: dict[str, Any] = {"size": int(info.get("size") or 0)}
    for key in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "updated"):
        if info.get(key) is not None:
            stamp["version"] = str(info[key])
            break
    return stamp


def config_payload(config: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprinted form of a stage config: its fields, FileInput fields replaced by their identity."""
    if not isinstance(config, BaseModel):
        return dict(config)
    data = config.model_dump(mode="json")
    for name in file_input_fields(type(config)):
        data[name] = file_identity(data[name])
    return data


def stage_fingerprint(name: str, version: int, config: BaseModel | Mapping[str, Any], upstream: str) -> str:
    return digest({"stage": name, "version": version, "config": config_payload(config), "upstream": upstream})


def source_fingerprint(input_uri: str, limit: int | None) -> str:
    return digest({"input": normalize_uri(input_uri), "limit": limit})


def chain_fingerprints(stages: Sequence[tuple[str, int, BaseModel | Mapping[str, Any]]],
                       source: str) -> dict[str, str]:
    """Fingerprints of stages in order, each chained on the previous one (the first on `source`)."""
    out: dict[str, str] = {}
    upstream = source
    for name, version, config in stages:
        upstream = out[name] = stage_fingerprint(name, version, config, upstream)
    return out
