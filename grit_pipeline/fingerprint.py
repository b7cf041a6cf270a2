"""Stage fingerprints: the cache keys of the run directory (`stages/<stage>/<fingerprint>/`).

fingerprint = sha256(stage name, stage version, canonical JSON of the stage config, upstream fingerprint),
cut to 16 hex digits. Each stage chains on the one before it, so changing `select.min_score` changes the
fingerprints of `select` and `compose` and nothing upstream: ingest, chunks and detect outputs are reused.
The chain starts from the source's identity (input URI and `run.limit`), so another input never
reuses a cached ingest.

Execution knobs never change outputs, so they are left out: config fields named like the fields of
`stages.base.Resources` (`cpus`, `gpus`, `batch_size`, `pool_size`) and whatever a stage lists in an
optional class attribute `fingerprint_exclude: tuple[str, ...]` (e.g. spaCy's internal batch size).
Changing `detect.batch_size` therefore reuses the GPU outputs already computed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

FINGERPRINT_LEN = 16
EXECUTION_FIELDS = ("cpus", "gpus", "batch_size", "pool_size")


def excluded_fields(stage_cls: Any) -> tuple[str, ...]:
    """Config fields of a stage class that are left out of its fingerprint."""
    return (*EXECUTION_FIELDS, *getattr(stage_cls, "fingerprint_exclude", ()))


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace; NaN/inf are refused so equal configs hash equally."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()[:FINGERPRINT_LEN]


def config_payload(config: BaseModel | Mapping[str, Any], exclude: Sequence[str] = ()) -> dict[str, Any]:
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
    return {k: v for k, v in data.items() if k not in set(exclude)}


def stage_fingerprint(name: str, version: int, config: BaseModel | Mapping[str, Any], upstream: str,
                      exclude: Sequence[str] = ()) -> str:
    return digest({"stage": name, "version": version, "config": config_payload(config, exclude),
                   "upstream": upstream})


def normalize_uri(uri: str) -> str:
    """Local paths become absolute so `data/in` and `./data/in` name the same source."""
    if "://" in uri or "::" in uri:
        return uri.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri)).rstrip("/") or "/"


def source_fingerprint(input_uri: str, limit: int | None) -> str:
    return digest({"input": normalize_uri(input_uri), "limit": limit})


def chain_fingerprints(stages: Sequence[tuple[str, int, BaseModel | Mapping[str, Any], Sequence[str]]],
                       source: str) -> dict[str, str]:
    """Fingerprints of stages in order, each chained on the previous one (the first on `source`)."""
    out: dict[str, str] = {}
    upstream = source
    for name, version, config, exclude in stages:
        upstream = out[name] = stage_fingerprint(name, version, config, upstream, exclude)
    return out
