"""Pipeline configuration: one typed section per stage plus `run`, loaded from YAML, overridden by dotted keys.

`PipelineConfig` has a field per stage in `stages.registry.STAGE_ORDER`, typed by that stage's own
pydantic `Config`, and a `run` section (`RunConfig`) for what is not a stage knob: where Ray runs, pool and
batch sizes, which shards. A stage section changes outputs (and fingerprints); `run` never does, except
`run.input` and `run.limit`, which decide what ingest reads.

    cfg = load_config("configs/demo.yaml", ["select.min_score=0.7", "run.resources.detect.pool_size=2"])

Override values are parsed as YAML scalars (`0.7` -> float, `true` -> bool, `[a, b]` -> list) and then
coerced by pydantic; an unknown key is an error that names it. `run.yaml` in a run directory is the
resolved config (`dump_config`) plus a `fingerprints:` section, which loading ignores.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from stages.base import Resources, StageConfig
from stages.registry import STAGE_ORDER, stage_class

# Keys `grit run` writes into run.yaml for readers (report, stats); not part of the config.
RUN_YAML_INFO_KEYS = ("fingerprints",)

_SHARD_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and what to do."""


class ResourceOverride(BaseModel):
    """Per-stage execution overrides (`run.resources.<stage>.<field>`); unset fields keep the stage's own."""

    model_config = ConfigDict(extra="forbid")

    cpus: float | None = Field(None, gt=0)
    gpus: float | None = Field(None, ge=0)
    batch_size: int | None = Field(None, ge=1)
    pool_size: int | None = Field(None, ge=1)

    def apply(self, base: Resources) -> Resources:
        return base.model_copy(update=self.model_dump(exclude_none=True))


class RunConfig(BaseModel):
    """How and where the pipeline runs. Nothing here changes a stage's output except `input` and `limit`."""

    model_config = ConfigDict(extra="forbid")

    input: str | None = None  # source URI (img2dataset folder, parquet, ...); `--input` sets it
    limit: int | None = Field(None, ge=1)  # keep only the first N source rows (in shard order)
    shards: str | None = None  # source shards to process, e.g. "0-9,12"; None = all
    address: str | None = None  # None: start local Ray; "auto", "ray://host:10001", "host:6379"
    num_cpus: int | None = Field(None, ge=1)  # local Ray only
    num_gpus: int | None = Field(None, ge=0)  # local Ray only
    resources: dict[str, ResourceOverride] = Field(default_factory=dict)
    loader_cpus: float = Field(0.5, gt=0)  # CPUs reserved by the tasks that read a shard's stage input
    prepare_memory_mb: int = Field(512, ge=1)  # memory reserved per prepare task (decoded images)
    progress: bool = True  # progress bars (ours per stage, and Ray Data's)
    storage_options: dict[str, Any] = Field(default_factory=dict)  # fsspec options for the run directory
    # Environment variables (fnmatch patterns) sent to the workers of a remote cluster, e.g. credentials
    # for s3:// inputs; local Ray workers inherit the driver's environment anyway.
    forward_env: list[str] = Field(
        default_factory=lambda: ["AWS_*", "FSSPEC_*", "GOOGLE_APPLICATION_CREDENTIALS", "HF_*",
                                 "TRANSFORMERS_OFFLINE", "NO_ALBUMENTATIONS_UPDATE"]
    )

    @field_validator("resources")
    @classmethod
    def _known_stages(cls, v: dict[str, ResourceOverride]) -> dict[str, ResourceOverride]:
        unknown = sorted(set(v) - set(STAGE_ORDER))
        if unknown:
            raise ValueError(f"unknown stage {unknown[0]!r} in run.resources; stages are {', '.join(STAGE_ORDER)}")
        return v

    @field_validator("shards", mode="before")
    @classmethod
    def _shard_spec(cls, v: object) -> str | None:
        if v is None:
            return None
        v = str(v)  # `run.shards=3` arrives as an int
        parse_shard_spec(v)
        return v

    def selected_shards(self, available: Sequence[int]) -> list[int]:
        if self.shards is None:
            return sorted(available)
        wanted = parse_shard_spec(self.shards)
        return sorted(set(available) & wanted)


def parse_shard_spec(spec: str | int) -> set[int]:
    """`"0-9,12"` -> {0, ..., 9, 12}. Ranges are inclusive."""
    out: set[int] = set()
    for part in str(spec).split(","):
        m = _SHARD_RANGE.match(part)
        if not m:
            raise ValueError(f"bad shard selection {part.strip()!r} in {spec!r}; use e.g. 3, 0-9 or 0-4,7")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"empty shard range {part.strip()!r} in {spec!r}")
        out.update(range(lo, hi + 1))
    return out


@functools.cache
def pipeline_config_model() -> type[BaseModel]:
    """Build the `PipelineConfig` model from the registered stages (imports each stage module once)."""
    fields: dict[str, Any] = {}
    for name in STAGE_ORDER:
        cfg_cls = stage_class(name).Config
        fields[name] = (cfg_cls, Field(default_factory=cfg_cls))
    fields["run"] = (RunConfig, Field(default_factory=RunConfig))
    return create_model(
        "PipelineConfig",
        __config__=ConfigDict(extra="forbid"),
        __doc__="The whole pipeline's configuration: one section per stage, plus `run`.",
        **fields,
    )


def __getattr__(name: str) -> Any:  # `from grit_pipeline.config import PipelineConfig`, built lazily
    if name == "PipelineConfig":
        return pipeline_config_model()
    raise AttributeError(name)


# --- loading ---------------------------------------------------------------------------------------------
def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                base: Mapping[str, Any] | None = None) -> BaseModel:
    """Read a YAML config (or start from `base`, or from defaults), apply `key=value` overrides, validate."""
    raw: dict[str, Any] = copy.deepcopy(dict(base or {}))
    if path is not None:
        raw = read_yaml(path)
    for key in RUN_YAML_INFO_KEYS:
        raw.pop(key, None)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    return validate_config(raw, source=str(path) if path is not None else "config")


def read_yaml(path: str | Path) -> dict[str, Any]:
    import fsspec

    try:
        with fsspec.open(str(path), "r", encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of stage names to settings, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """`"select.min_score=0.7"` -> ("select.min_score", 0.7); the value is read as a YAML scalar/flow."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or "." not in key:
        raise ConfigError(f"bad override {item!r}: use stage.key=value, e.g. select.min_score=0.7")
    try:
        value = yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        value = text
    return key, value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set `raw[a][b][c] = value` for `key="a.b.c"`, checking each part against the config model."""
    parts = key.split(".")
    model: Any = pipeline_config_model()
    node = raw
    for i, part in enumerate(parts):
        so_far = ".".join(parts[: i + 1])
        if isinstance(model, type) and issubclass(model, BaseModel):
            if part not in model.model_fields:
                known = ", ".join(sorted(model.model_fields)) or "(none)"
                raise ConfigError(f"unknown config key {so_far!r}; known keys here: {known}")
            model = _field_model(model.model_fields[part].annotation)
        elif model is dict:
            model = _dict_value_model(parts, i)
        else:
            raise ConfigError(f"unknown config key {so_far!r}: {'.'.join(parts[:i])} is not a section")
        if i == len(parts) - 1:
            node[part] = value
        else:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif hasattr(child, "model_dump"):
                child = node[part] = child.model_dump()
            elif not isinstance(child, dict):
                raise ConfigError(f"cannot set {key!r}: {so_far!r} is {child!r}, not a section")
            node = child


def _field_model(annotation: Any) -> Any:
    """The model class, `dict`, or None (a leaf) behind a field annotation."""
    import typing

    origin = typing.get_origin(annotation)
    if origin in (dict, Mapping):
        return dict
    if origin is not None:  # Optional[Model], Union[...]: use the first model or dict inside
        for arg in typing.get_args(annotation):
            found = _field_model(arg)
            if found is not None:
                return found
        return None
    if isinstance(annotation, type) and (issubclass(annotation, BaseModel) or annotation is dict):
        return annotation
    return None


def _dict_value_model(parts: list[str], i: int) -> Any:
    # run.resources.<stage>.<field>: the dict's values are ResourceOverride; other dicts are free-form
    if parts[:2] == ["run", "resources"] and i == 2:
        if parts[i] not in STAGE_ORDER:
            raise ConfigError(f"unknown stage {parts[i]!r} in {'.'.join(parts[:3])}; "
                              f"stages are {', '.join(STAGE_ORDER)}")
        return ResourceOverride
    return dict


def validate_config(raw: Mapping[str, Any], source: str = "config") -> BaseModel:
    model = pipeline_config_model()
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: " + format_validation_error(e)) from None


def format_validation_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown config key {loc!r}")
        else:
            got = err.get("input")
            lines.append(f"{loc}: {err['msg']} (got {got!r})")
    return "; ".join(lines)


# --- writing ---------------------------------------------------------------------------------------------
def config_dict(config: BaseModel) -> dict[str, Any]:
    """The resolved config as plain data, stage sections in pipeline order, then `run`."""
    return config.model_dump(mode="json")


def dump_config(config: BaseModel, fingerprints: Mapping[str, str] | None = None) -> str:
    data = config_dict(config)
    if fingerprints:
        data["fingerprints"] = dict(fingerprints)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def stage_config(config: BaseModel, stage: str) -> StageConfig:
    return getattr(config, stage)


def stage_resources(config: BaseModel, stage: str, stage_obj: Any) -> Resources:
    """The stage's declared resources with `run.resources.<stage>` applied."""
    base: Resources = stage_obj.resources
    override = config.run.resources.get(stage)
    return override.apply(base) if override is not None else base
