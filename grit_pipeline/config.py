"""Pipeline configuration: one typed section per stage plus `run`, loaded from YAML, overridden by dotted keys.

`PipelineConfig` has a field per stage in `stages.registry.STAGE_ORDER`, typed by that stage's own
pydantic `Config` (semantic: every field is fingerprinted), and a `run` section (`RunConfig`) for how and
where it runs. Every execution knob lives in one place, `run.resources.<stage>`, typed by the stage's
`Execution` model (batch and pool sizes, CPUs, GPUs, device, ...): changing one never changes
a fingerprint or a row. `run` never changes outputs, except `run.input` and `run.limit`, which decide
what ingest reads.

    cfg = load_config("configs/demo.yaml", ["select.min_score=0.7", "run.resources.detect.pool_size=2"])

`load_settings` is the one loader of YAML plus dotted overrides, for this config and the trainer's
(`grit_pipeline.train.config`): override values are parsed as YAML scalars (`0.7` -> float, `true` ->
bool, `[a, b]` -> list) and coerced by pydantic; an unknown key is a `ConfigError` naming it (the CLI
exits 2). `run.yaml` in a run directory is the resolved config (`dump_config`) plus a `fingerprints:`
section, which loading ignores.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from grit_pipeline.errors import UserError, yaml_problem
from grit_pipeline.shard_ranges import ShardRanges
from stages.registry import STAGE_ORDER, stage_class

# Keys `grit run` writes into run.yaml for readers (report, stats); not part of the config.
RUN_YAML_INFO_KEYS = ("fingerprints", "layout", "planned_shards", "allowed_images")



class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used; the message names the key and what to do."""


def _stage_resources_model(stages: tuple[tuple[str, type], ...]) -> type[BaseModel]:
    """`run.resources`: one section per stage, typed by that stage's `Execution` model."""
    fields: dict[str, Any] = {name: (cls.Execution, Field(default_factory=cls.Execution)) for name, cls in stages}
    return create_model("StageResources", __config__=ConfigDict(extra="forbid"),
                        __doc__="Execution settings per stage (`run.resources.<stage>.<field>`).", **fields)


def registered_stages() -> tuple[tuple[str, type], ...]:
    return tuple((name, stage_class(name)) for name in STAGE_ORDER)


StageResources = _stage_resources_model(registered_stages())


class RunConfig(BaseModel):
    """How and where the pipeline runs. Nothing here changes a stage's output except `input` and `limit`."""

    model_config = ConfigDict(extra="forbid")

    input: str | None = None  # source URI (img2dataset folder, parquet, ...); `--input` sets it
    limit: int | None = Field(None, ge=1)  # keep only the first N source rows (in shard order)
    shards: str | None = None  # source shards to process, e.g. "0-9,12"; None = all
    address: str | None = None  # None: start local Ray; "auto", "ray://host:10001", "host:6379"
    num_cpus: int | None = Field(None, ge=1)  # local Ray only
    num_gpus: int | None = Field(None, ge=0)  # local Ray only
    resources: StageResources = Field(default_factory=StageResources)  # type: ignore[valid-type]
    # Shards the CPU stages may run ahead of the GPU stage, beyond one per actor of the stages up to detect
    # (spaCy and detector actors): enough that the GPU never waits for chunks, few enough that a week-long
    # run keeps memory and disk bounded.
    shards_ahead: int = Field(2, ge=0)
    progress: bool = True  # progress bars, one per stage
    # One `grit run` per run directory (`grit_pipeline.rundir.lease`): a lease whose heartbeat (refreshed every
    # 30 s, or a quarter of this if less) is older than this many seconds belongs to a dead run and is
    # taken over.
    lease_stale_s: float = Field(600.0, gt=0)
    # Ctrl-C / SIGTERM: how long to wait for the shards in flight to commit before cancelling them.
    stop_grace_s: float = Field(120.0, ge=0)
    storage_options: dict[str, Any] = Field(default_factory=dict)  # fsspec options for the run directory
    # Environment variables (fnmatch patterns) sent to the workers of a remote cluster, e.g. credentials
    # for s3:// inputs; local Ray workers inherit the driver's environment anyway.
    forward_env: list[str] = Field(
        default_factory=lambda: ["AWS_*", "FSSPEC_*", "GOOGLE_APPLICATION_CREDENTIALS", "HF_*",
                                 "TRANSFORMERS_OFFLINE", "NO_ALBUMENTATIONS_UPDATE"]
    )

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
    """`"0-9,12"` -> {0, ..., 9, 12}. Ranges are inclusive (`grit_pipeline.shard_ranges`)."""
    if not str(spec).strip():
        raise ConfigError(f"bad shard selection {spec!r}; use e.g. 3, 0-9 or 0-4,7")
    try:
        return set(ShardRanges.parse(spec))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def shards_of(values: Any) -> str:
    """Compact text of shard numbers: [0, 1, 2, 5] -> '0-2,5'."""
    return str(ShardRanges(values))


@functools.cache
def pipeline_config_model(stages: tuple[tuple[str, type], ...] | None = None) -> type[BaseModel]:
    """The `PipelineConfig` model: a section per stage (its `Config`) and `run` (whose `resources` hold a
    section per stage, its `Execution`). `stages`: (name, class) pairs in order; default the registered."""
    fields: dict[str, Any] = {}
    run_model = RunConfig
    if stages is not None and stages != registered_stages():
        resources = _stage_resources_model(stages)
        run_model = create_model("RunConfig", __base__=RunConfig,
                                 resources=(resources, Field(default_factory=resources)))
    for name, cls in stages or registered_stages():
        fields[name] = (cls.Config, Field(default_factory=cls.Config))
    fields["run"] = (run_model, Field(default_factory=run_model))
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
    """The pipeline config: `base` (or defaults), then a YAML file, then `stage.key=value` overrides."""
    return load_settings(pipeline_config_model(), path, overrides, base, dotted_keys=True,
                         ignore=RUN_YAML_INFO_KEYS)


M = TypeVar("M", bound=BaseModel)


def load_settings(model: type[M], path: str | Path | None = None, overrides: Sequence[str] = (),
                  base: Mapping[str, Any] | None = None, *, dotted_keys: bool = False,
                  ignore: Sequence[str] = ()) -> M:
    """Any settings model from `base`, a YAML file merged over it, and `key=value` overrides.

    Every key is checked against `model` (also inside nested sections), errors name the key and raise
    `ConfigError`. `dotted_keys` requires overrides to name a section (`stage.key=value`)."""
    raw: dict[str, Any] = copy.deepcopy(dict(base or {}))
    if path is not None:
        _deep_merge(raw, read_yaml(path))
    for key in ignore:
        raw.pop(key, None)
    for item in overrides:
        key, value = parse_override(item, dotted=dotted_keys)
        set_dotted(raw, key, value, model)
    return validate_config(raw, source=str(path) if path is not None else "config", model=model)


def _deep_merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def read_yaml(path: str | Path) -> dict[str, Any]:
    import fsspec

    try:
        with fsspec.open(str(path), "r", encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML file (not UTF-8 text)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of section names to settings, got {type(data).__name__}")
    return data


def parse_override(item: str, dotted: bool = True) -> tuple[str, Any]:
    """`"select.min_score=0.7"` -> ("select.min_score", 0.7); the value is read as a YAML scalar/flow."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or (dotted and "." not in key):
        example = "stage.key=value, e.g. select.min_score=0.7" if dotted else "key=value, e.g. lr=3e-4"
        raise ConfigError(f"bad override {item!r}: use {example}")
    try:
        value = yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        value = text
    return key, value


def set_dotted(raw: dict[str, Any], key: str, value: Any, root: type[BaseModel] | None = None) -> None:
    """Set `raw[a][b][c] = value` for `key="a.b.c"`, checking each part against the config model."""
    parts = key.split(".")
    model: Any = root if root is not None else pipeline_config_model()
    node = raw
    for i, part in enumerate(parts):
        so_far = ".".join(parts[: i + 1])
        if isinstance(model, type) and issubclass(model, BaseModel):
            if part not in model.model_fields:
                hint = moved_key_hint(parts[: i + 1])
                known = ", ".join(sorted(model.model_fields)) or "(none)"
                raise ConfigError(f"unknown config key {so_far!r}; " + (hint or f"known keys here: {known}"))
            model = _field_model(model.model_fields[part].annotation)
        elif model is dict:
            model = dict
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


def moved_key_hint(parts: Sequence[str]) -> str | None:
    """For `detect.batch_size` and other execution settings written in a stage's section, or a semantic
    setting under `run.resources` (`run.resources.detect.precision`, moved in detect v3): where they live."""
    if len(parts) == 4 and tuple(parts[:2]) == ("run", "resources") and parts[2] in STAGE_ORDER:
        stage, field = parts[2], parts[3]
        if field in stage_class(stage).Config.model_fields:
            return f"{field!r} changes the stage's output, so it is part of its config: set {stage}.{field} instead"
        return None
    if len(parts) != 2 or parts[0] not in STAGE_ORDER:
        return None
    stage, field = parts
    if field in stage_class(stage).Execution.model_fields:
        return (f"{field!r} is an execution setting (it never changes the output): set "
                f"run.resources.{stage}.{field} instead")
    return None


def _field_model(annotation: Any) -> Any:
    """The model class, `dict`, or None (a leaf) behind a field annotation."""
    import typing

    origin = typing.get_origin(annotation)
    if origin in (dict, Mapping):
        return dict
    if origin is not None:  # Optional[Model], Union[...], Annotated[...]: the first model or dict inside
        for arg in typing.get_args(annotation):
            found = _field_model(arg)
            if found is not None:
                return found
        return None
    if isinstance(annotation, type) and (issubclass(annotation, BaseModel) or annotation is dict):
        return annotation
    return None


def validate_config(raw: Mapping[str, Any], source: str = "config", model: type[M] | None = None) -> M:
    model = model if model is not None else pipeline_config_model()
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: " + format_validation_error(e)) from None


def format_validation_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            hint = moved_key_hint([str(p) for p in err["loc"]])
            lines.append(f"unknown config key {loc!r}" + (f" ({hint})" if hint else ""))
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
