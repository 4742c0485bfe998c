"""The experiment spec's models: the experiment, its stages, where a stage starts from, and the
runtime section."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, field_validator, model_validator

from ..errors import Problem
from .calls import DataCall, LoggerCall, ModelCall, PluginSection
from .problems import locate

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # Inductor's modes


class CompileSpec(StrictModel):
    """`runtime.compile` as a mapping: torch.compile's options for the model a train stage trains."""

    mode: Literal[COMPILE_MODES] = Field("default", description="Inductor's mode: `reduce-overhead` and `max-autotune` capture CUDA graphs (CUDA only).")
    fullgraph: bool = Field(False, description="One graph or an error: a plugin that breaks the graph stops the stage instead of running partly eager.")
    dynamic: Optional[bool] = Field(
        None, description="null: the batch dimension is dynamic (the smaller last batch and the evaluation batches reuse the "
        "graph); true: every dimension; false: a graph per input shape.")
    backend: Literal["inductor", "aot_eager", "eager"] = Field(
        "inductor", description="`inductor` compiles; `aot_eager` and `eager` trace without compiling (to tell a compiler "
        "problem from a tracing one).")

    @model_validator(mode="after")
    def _mode_is_inductors(self):
        if self.backend != "inductor" and self.mode != "default":
            raise ValueError(f"mode {self.mode!r} is Inductor's: with backend {self.backend!r} leave mode out")
        return self


def _compile_kind(v: Any) -> str:
    """Which form `runtime.compile` is written in (its errors are that form's alone)."""
    return "[mapping]" if isinstance(v, (dict, CompileSpec)) else "[name]"


class RuntimeSpec(StrictModel):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto` picks CUDA when available.")
    output_dir: str = Field("runs", min_length=1, description="Where stage directories go, relative to the spec file.")
    nproc_per_node: int = Field(
        1, ge=1, le=1024, description="Processes on this node (DDP when > 1): `pab run` starts them through torch's elastic "
        "launcher; `pab run --nproc N` overrides; under torchrun the launcher's world size rules."
    )
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="Process-group backend: `auto` is NCCL on CUDA, gloo on the CPU.")
    dist_timeout_s: int = Field(
        600, ge=10, le=86_400, description="A rank that waits this long in a collective gives up (a dead rank ends the job at once)."
    )
    batch_size_is: Literal["global", "per_rank"] = Field(
        "global", description="What data.batch_size means under DDP: `global` (split among the processes, so the spec means the "
        "same on any number of them) or `per_rank` (each process takes that many; the global batch grows with the processes)."
    )
    sync_bn: bool = Field(False, description="Synchronised BatchNorm across processes (CUDA only); otherwise each rank normalises its own batch.")
    num_workers: int = Field(0, ge=0, le=256, description="DataLoader worker processes per rank (0: load in the main process).")
    pin_memory: Optional[bool] = Field(None, description="Pinned host memory for batches (default: on with CUDA).")
    persistent_workers: Optional[bool] = Field(None, description="Keep DataLoader workers between epochs (default: on when num_workers > 0).")
    prefetch_factor: Optional[int] = Field(None, ge=1, le=1024, description="Batches each worker loads ahead (needs num_workers > 0).")
    channels_last: bool = Field(False, description="Channels-last memory format for the model and its image batches (faster convolutions on recent GPUs).")
    amp: Literal["none", "bf16", "fp16"] = Field(
        "none", description="Automatic mixed precision of the forward pass: bf16, or fp16 with a gradient scaler (CUDA)."
    )
    compile: Annotated[Union[Annotated[Literal[("none",) + COMPILE_MODES], Tag("[name]")], Annotated[CompileSpec, Tag("[mapping]")]],
                       Discriminator(_compile_kind)] = Field(
        "none", json_schema_extra={"key": False},  # compiled or eager, a stage computes the same (up to float rounding)
        description="torch.compile the model the train stage trains (and its evaluation): `none`, `default`, `reduce-overhead` "
        "(CUDA graphs), `max-autotune`, `max-autotune-no-cudagraphs`, or a mapping {mode, fullgraph, dynamic, backend}. "
        "Stage keys leave it out: a run interrupted compiled resumes eager and the other way round.",
    )
    progress: Literal["auto", "rich", "plain", "none"] = Field(
        "auto", description="Progress display: rich bars on a terminal, plain log lines otherwise."
    )
    loggers: list[Union[Literal["jsonl"], LoggerCall]] = Field(
        default_factory=lambda: ["jsonl"],
        description="Trackers of every training stage besides its metrics.jsonl, which is always written (`jsonl` names it; reports "
        "and caching read it): `pab.loggers` plugins by name or as {name: ..., <parameters>}: `csv` (metrics.csv), `tensorboard` "
        "(event files under tb/), `mlflow`, `wandb` (each needs its extra: pab[tensorboard], pab[mlflow], pab[wandb]), a package's own. Only rank 0 logs.",
    )
    max_restarts: int = Field(
        0, ge=0, le=1000, description="`pab run --nproc N`: times the elastic launcher restarts the processes when one dies; "
        "each restart resumes from the stage's checkpoint (`pab run --max-restarts` overrides).")

    def compile_options(self) -> CompileSpec | None:
        """`compile` as a mapping; None when the model runs eager."""
        if isinstance(self.compile, CompileSpec):
            return self.compile
        return None if self.compile == "none" else CompileSpec(mode=self.compile)

    @field_validator("persistent_workers", "prefetch_factor")
    @classmethod
    def _needs_workers(cls, v, info):
        if v not in (None, False) and info.data.get("num_workers", 0) == 0:
            raise ValueError(f"{info.field_name} needs DataLoader workers (runtime.num_workers > 0)")
        return v


class Source(StrictModel):
    """Where a stage takes its masks or weights from: an upstream `stage` (with `epoch`: the
    weights that stage kept after that epoch), or a model.pt `path`."""

    stage: Optional[str] = Field(None, description="A stage of this spec (it runs first).")
    epoch: Optional[int] = Field(None, ge=0, le=100_000, description="With stage: its weights after this epoch (0: before training).")
    path: Optional[str] = Field(None, min_length=1, description="A model.pt file (relative to the spec file).")

    @model_validator(mode="after")
    def _one(self):
        if (self.stage is None) == (self.path is None):
            raise ValueError("give either stage or path")
        if self.epoch is not None and self.stage is None:
            raise ValueError("epoch goes with stage (the weights that stage kept after that epoch)")
        return self


def _source(v: Any, special: str) -> Any:
    if isinstance(v, str) and v != special:
        return {"stage": v}
    return v


class StageSpec(PluginSection):
    """A stage: its `kind` (a stage plugin), the stages it runs `after`, where it takes its masks
    and weights from, and the kind's own keys."""

    name_key: ClassVar[str] = "kind"
    group: ClassVar[str] = "pab.stages"
    omit_if_none: ClassVar[tuple[str, ...]] = ("masks_from", "weights_from")
    kind: str = Field(description="Stage kind: prune, train, evaluate, or a plugin's.")
    after: list[str] = Field(default_factory=list, description="Stages whose artifacts this stage starts from.")
    masks_from: Optional[Union[Literal["dense"], Source]] = Field(
        None, description="The masks to start from: a stage id, {stage: id}, {path: model.pt}, or `dense` (none); "
        "default: the last stage in `after` that left a model.")
    weights_from: Optional[Union[Literal["init"], Source]] = Field(
        None, description="The weights to start from: a stage id, {stage: id, epoch: k} (rewinding), {path: model.pt}, or `init` "
        "(the initialisation); default: the last stage in `after` that left a model.")

    @field_validator("masks_from", mode="before")
    @classmethod
    def _masks_source(cls, v):
        return _source(v, "dense")

    @field_validator("weights_from", mode="before")
    @classmethod
    def _weights_source(cls, v):
        return _source(v, "init")

    @field_validator("masks_from")
    @classmethod
    def _no_epoch_for_masks(cls, v):
        if isinstance(v, Source) and v.epoch is not None:
            raise ValueError("masks come from a stage's model.pt: epoch goes with weights_from only")
        return v

    def sources(self) -> dict[str, Source]:
        """`masks_from` and `weights_from`, those that name a stage or a file."""
        return {k: src for k in ("masks_from", "weights_from") if isinstance(src := getattr(self, k), Source)}

    def dependencies(self) -> list[str]:
        """`after`, then the stages masks and weights come from: all of them run first."""
        out = list(self.after)
        for src in self.sources().values():
            if src.stage is not None and src.stage not in out:
                out.append(src.stage)
        return out


class ExperimentSpec(StrictModel):
    name: str = Field(..., pattern=NAME_PATTERN, max_length=128, description="Experiment name; runs go to <output_dir>/<name>/.")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Seed of initialisation, pruning and data order.")
    vars: dict[str, Any] = Field(
        default_factory=dict, description="Named values; `${name}` anywhere else in the spec stands for one (a grid can vary vars.x).")
    model: ModelCall
    data: DataCall
    stages: dict[str, StageSpec] = Field(..., min_length=1)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)

    # where the spec came from: relative paths in it resolve against this directory
    _base_dir: Path = PrivateAttr(default=Path("."))
    _source: str = PrivateAttr(default="<spec>")
    _loaded: Any = PrivateAttr(default=None)  # the parsed file's lines, for problem()
    _overridden: dict = PrivateAttr(default_factory=dict)  # key path -> the --set that gave it
    _remap: dict = PrivateAttr(default_factory=dict)  # a repeated block's expanded key paths -> where it is written

    @field_validator("stages")
    @classmethod
    def _stage_ids(cls, v: dict) -> dict:
        for sid in v:
            if not re.match(NAME_PATTERN, str(sid)):
                raise ValueError(f"stage id {sid!r} must be letters, digits, '_', '.', '-'")
        return v

    def place(self, source: str, loaded: Any, overridden: dict, remap: dict, base_dir: Path | None) -> None:
        """Record where the spec came from: its file (parsed, for lines), the --set overrides,
        a repeated block's remapped paths, and the folder relative paths resolve against."""
        self._base_dir = base_dir if base_dir is not None else Path(".")
        self._source, self._loaded, self._overridden, self._remap = source, loaded, dict(overridden), dict(remap)

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def source(self) -> str:
        return self._source

    def problem(self, path: tuple, message: str) -> Problem:
        """A problem with the value at key path `path`, placed where that value came from (the
        spec file and line, or the --set that gave it)."""
        return locate(path, message, self._source, self._loaded, self._overridden, self._remap)

    def resolve_path(self, p: str | Path) -> Path:
        p = Path(p).expanduser()
        return p if p.is_absolute() else (self._base_dir / p).resolve()

    @property
    def output_root(self) -> Path:
        return self.resolve_path(self.runtime.output_dir) / self.name

    def resolved_dict(self) -> dict:
        return self.model_dump(mode="json")
