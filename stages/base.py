"""The stage contract every pipeline step implements, and the reject bookkeeping they share.

The engine (`grit_pipeline.engine`) runs stages in the fixed order ingest -> chunks -> detect -> select ->
compose over source shards. For each stage and shard it hands `process_batch` a table holding `key` plus
the columns of all upstream outputs, restricted to the rows that survived the previous stage, in source
order. The stage returns its output rows (`key` + the columns it adds, matching `output_schema`) and its
rejected rows; every input row ends in exactly one of the two (`in = out + rejects`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.tables import REJECT_SCHEMA


class StageConfig(BaseModel):
    """Base of every stage's *semantic* config: every field may change the stage's output, so every field
    is part of the stage's fingerprint. Unknown keys are errors, so a typo in `select.min_scor=` fails
    loudly. How a stage runs (batch sizes, pools, GPUs, device) lives in its `Execution`; a knob that moves
    outputs (detect's numeric precision) is semantic, whatever its name suggests."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FileInput:
    """Marks a config field that names a file or folder the stage reads (weights, a replay file, a model
    directory): `Annotated[str | None, FileInput()]`. The fingerprint hashes what the path points to
    (normalized location, size, modification time or etag), not how the path was spelled."""

    def __repr__(self) -> str:
        return "FileInput()"


class Execution(BaseModel):
    """How one stage runs: never part of a fingerprint, never changes a row of output. Set per stage as
    `run.resources.<stage>.<field>`; stages with more knobs subclass it (`DetectExecution`, ...)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    cpus: float = Field(1.0, gt=0, description="CPUs one worker (task or actor) of the stage reserves.")


class ActorExecution(Execution):
    """Execution of a stage that keeps a model loaded in a pool of long-lived actors."""

    pool_size: int = Field(1, ge=1, description="Actors in the pool (each loads the model once).")
    batch_size: int = Field(1000, ge=1, description="Rows per `process_batch` call.")


class PreparedExecution(ActorExecution):
    """Execution of an actor stage with a CPU `prepare_batch` (detect: image reading and decoding) that
    runs in tasks ahead of the actors. The engine cuts a shard into parts (`Resources.part_rows` rows):
    one prepare task and one actor call per part, the actor running `process_batch` over the part in
    slices of `Resources.batch_size` rows."""

    queued_parts: int | None = Field(
        1, ge=0, description="Prepared parts per actor besides the one it runs (being prepared, waiting, or "
        "queued at the actor); 1 lets the next part be prepared while the actor runs one, 0 makes the actor "
        "wait for each. Prepared data (detect: decoded pixels) stays within pool_size x (1 + queued_parts) "
        "full parts of the stage (a small shard's smaller parts count by their rows).")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "queued_batches" in data:
            raise ValueError("queued_batches was replaced by queued_parts: whole parts (detect: part_rows rows) "
                             "waiting per actor besides the one it runs")
        return data


class Resources(BaseModel):
    """What the engine schedules for one stage, derived from its `Execution`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpus: float = 1.0
    gpus: float = 0.0
    actor: bool = False  # keep model state in a long-lived actor pool
    batch_size: int | None = None  # rows per process_batch call; None = one call per shard
    part_rows: int | None = None  # a stage run in parts: rows per part (a prepare task, an actor call); None = batch_size
    queued_parts: int = 1  # a stage run in parts: prepared parts per actor besides the one it runs
    pool_size: int = 1  # actors in the pool, when actor=True


@dataclass
class StageResult:
    output: pa.Table
    rejects: pa.Table
    # Counts of things the stage did to rows it passed on, by name (e.g. ingest's "control_chars_removed");
    # the engine adds them to the shard's stats (`grit_pipeline.engine.stats.shard_stats(counters=...)`).
    counters: dict[str, int] = field(default_factory=dict)


@dataclass
class RejectCollector:
    """Accumulates rejected rows of one stage; `table()` gives them in the REJECT_SCHEMA."""

    stage: str
    keys: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    def add(self, key: str, reason: str, detail: str = "") -> None:
        self.keys.append(key)
        self.reasons.append(str(getattr(reason, "value", reason)))
        self.details.append(detail)

    def __len__(self) -> int:
        return len(self.keys)

    def table(self) -> pa.Table:
        return pa.table(
            {
                "key": pa.array(self.keys, pa.string()),
                "stage": pa.array([self.stage] * len(self.keys), pa.string()),
                "reason": pa.array(self.reasons, pa.string()),
                "detail": pa.array(self.details, pa.string()),
            },
            schema=REJECT_SCHEMA,
        )


ConfigT = TypeVar("ConfigT", bound=StageConfig)


class Stage(ABC, Generic[ConfigT]):
    """One step of the pipeline.

    Subclasses declare, as class variables, `name`, `version`, `Config` (semantic settings, fingerprinted),
    `Execution` (how it runs, never fingerprinted) and `output_schema`, and implement `process_batch`.
    Bump `version` whenever a change alters the stage's output: it is part of the fingerprint that
    decides whether cached outputs are reused.
    """

    name: ClassVar[str]
    version: ClassVar[int]
    Config: ClassVar[type[StageConfig]]
    Execution: ClassVar[type[Execution]] = Execution
    output_schema: ClassVar[pa.Schema]

    def __init__(self, config: ConfigT | None = None, execution: Execution | None = None):
        self.config: ConfigT = config if config is not None else self.Config()  # type: ignore[assignment]
        self.execution = execution if execution is not None else self.Execution()

    @property
    def resources(self) -> Resources:
        """What the engine schedules; by default one task per shard with `execution.cpus`."""
        ex = self.execution
        if isinstance(ex, ActorExecution):
            queued = ex.queued_parts if isinstance(ex, PreparedExecution) and ex.queued_parts is not None else 1
            return Resources(cpus=ex.cpus, actor=True, batch_size=ex.batch_size, pool_size=ex.pool_size,
                             queued_parts=queued)
        return Resources(cpus=ex.cpus)

    def setup(self) -> None:
        """Load models once per worker. Called before the first batch; must be idempotent."""

    def prepare_batch(self, table: pa.Table) -> StageResult:
        """Optional CPU pre-step the engine runs in tasks ahead of `process_batch` (e.g. image decoding
        ahead of GPU actors). Its output is the input of `process_batch`; its rejects count for this stage."""
        return StageResult(table, REJECT_SCHEMA.empty_table())

    @classmethod
    def has_prepare(cls) -> bool:
        """Whether the stage overrides `prepare_batch` (the engine then runs that step in CPU tasks)."""
        return cls.prepare_batch is not Stage.prepare_batch

    @abstractmethod
    def process_batch(self, table: pa.Table) -> StageResult:
        """Turn one batch of input rows into output rows and rejects."""

    def rejects(self) -> RejectCollector:
        return RejectCollector(self.name)
