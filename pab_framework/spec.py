"""The experiment spec: pydantic models, plugin calls validated by each plugin's own `Params`,
command-line overrides, and errors that name the file, the line and the key path."""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_serializer, model_validator

from .errors import Problem, SpecError, PluginError
from .expand import expand, original_path
from .registry import Registry, registry as default_registry
from .yamlio import LoadedYaml, load_yaml_file, load_yaml_text, parse_scalar

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


# --------------------------------------------------------------------------- plugin calls
class PluginCall(BaseModel):
    """A section of the spec that names a plugin (`name:`) and passes it parameters.

    Keys declared on the subclass belong to the framework (a pruner call's `density`, say); every
    other key belongs to the plugin and is validated by the plugin's own `Params` model.
    """

    model_config = ConfigDict(extra="allow")
    group: ClassVar[str] = ""
    also_groups: ClassVar[tuple[str, ...]] = ()  # further entry-point groups searched for `name`, in order
    name: str = Field(description="Which plugin; `pab plugins` lists the installed ones.")

    @classmethod
    def groups(cls) -> tuple[str, ...]:
        return (cls.group, *cls.also_groups)

    _entry: Any = PrivateAttr(default=None)
    _params: Any = PrivateAttr(default=None)

    @property
    def plugin(self) -> Any:
        """The plugin object (its class instantiated once by the registry)."""
        if self._entry is None:
            raise RuntimeError(f"plugin call {self.name!r} used before the spec was resolved")
        return self._entry.obj

    @property
    def params(self) -> BaseModel:
        if self._params is None:
            raise RuntimeError(f"plugin call {self.name!r} used before the spec was resolved")
        return self._params

    def plugin_keys(self) -> dict:
        return dict(self.model_extra or {})

    @model_serializer(mode="wrap")
    def _serialize(self, handler):
        data = handler(self)
        if self._params is not None:  # resolved: the plugin's parameters with their defaults
            own = {k: data[k] for k in type(self).model_fields if k in data}
            own.update(self._params.model_dump(mode="json"))
            return own
        return data


class ModelCall(PluginCall):
    group: ClassVar[str] = "pab.models"
    init: Literal["default", "kaiming_normal", "kaiming_uniform", "kaiming_constant_signed"] = Field(
        "default",
        description="Initialisation of the prunable weights: `default` keeps the model's own; the kaiming "
        "methods use fan-in and the ReLU gain, as the original PaB code does.",
    )
    init_scope: Literal["conv", "all"] = Field(
        "all",
        description="Which weights `init` re-draws: `conv` (Conv2d only, as the original PaB code) or `all` "
        "prunable weights (Conv2d and Linear).",
    )
    batchnorm_affine: bool = Field(
        True, description="false: every BatchNorm layer without its learned scale and shift (edge-popup's setting); "
        "for models with BatchNorm.")


class DataCall(PluginCall):
    group: ClassVar[str] = "pab.datasets"
    batch_size: int = Field(128, ge=1, le=1 << 20, description="Training batch size: the global batch, or per process (runtime.batch_size_is).")
    eval_batch_size: Optional[int] = Field(None, ge=1, le=1 << 20, description="Validation batch size (default: batch_size), read as batch_size is.")


class PrunerCall(PluginCall):
    group: ClassVar[str] = "pab.pruners"
    density: float = Field(..., gt=0, le=1, description="Fraction of prunable weights kept, in (0, 1].")
    iterations: int = Field(1, ge=1, le=100_000, description="Score-and-mask rounds (SynFlow uses 100).")
    schedule: Literal["exponential", "linear"] = Field(
        "exponential", description="How density falls over the iterations: density**(k/n) or linearly."
    )
    scope: Literal["global", "local"] = Field(
        "global", description="`global`: one threshold over all layers; `local`: every layer keeps `density`."
    )
    classifier_density: Optional[float] = Field(
        None, gt=0, le=1, description="A separate kept fraction for the final classifier layer (default: as the others); "
        "1.0 leaves it out of pruning and scoring altogether, as the original CIFAR code's plain nn.Linear."
    )
    exclude: list[str] = Field(
        default_factory=list, json_schema_extra={"key": "if_set"},
        description="Parameter-name patterns (fnmatch: `*` spans dots) of prunable weights to keep dense and outside the pool: "
        "neither scored nor pruned, and not counted for the global threshold, as the layers the original code builds unmasked "
        "(its ImageNet ResNet-50's shortcut convolutions: `*.downsample.*`). A pattern that matches nothing is an error.")
    prune_bias: bool = Field(False, description="Also prune the biases of the prunable layers.")
    prune_batchnorm: bool = Field(False, description="Also prune BatchNorm weights (and biases with prune_bias).")
    train_mode: bool = Field(False, description="Score with BatchNorm in train mode (default: eval mode, as the original).")
    reinitialize: bool = Field(
        False, description="After pruning, re-draw the surviving weights with the model's init (the random re-init ablation)."
    )
    batches: int = Field(1, ge=1, le=100_000, description="Pruning batches for data-dependent pruners (SNIP, GraSP).")
    batch_size: int = Field(
        100, ge=1, le=1_000_000, description="Samples per pruning batch, drawn from a seeded subset of the training set."
    )

    rounds: Optional[int] = Field(
        None, ge=1, le=100_000, description="Iterative pruning across stages (lottery-ticket rounds): with `round`, this stage "
        "is round `round` of `rounds` of one schedule to `density`, and keeps density**(round/rounds) (exponential) of the weights.")
    round: Optional[int] = Field(None, ge=1, le=100_000, description="This stage's round, 1..rounds (`${round}` in a repeated block).")

    @model_validator(mode="after")
    def _rounds(self):
        if (self.round is None) != (self.rounds is None):
            raise ValueError("round and rounds go together")
        if self.round is not None and self.round > self.rounds:
            raise ValueError(f"round {self.round} is past rounds {self.rounds}")
        return self

    def target_density(self) -> float:
        """The density this stage ends at: `density`, or its round's share of the schedule."""
        if self.rounds is None:
            return self.density
        from .masking import density_at

        return density_at(self.round, self.rounds, self.density, self.schedule)

    def mask_policy(self):
        """The masking options of this section (how scores become masks), for `masking.prune`."""
        from .masking import MaskPolicy

        cd = self.classifier_density
        if cd is not None and self.rounds is not None:
            from .masking import density_at

            cd = density_at(self.round, self.rounds, cd, self.schedule)
        return MaskPolicy(density=self.target_density(), iterations=self.iterations, schedule=self.schedule, scope=self.scope,
                          classifier_density=cd, prune_bias=self.prune_bias, prune_batchnorm=self.prune_batchnorm,
                          exclude=tuple(self.exclude))


class OptimizerCall(PluginCall):
    group: ClassVar[str] = "pab.optimizers"


class QuantizerCall(PluginCall):
    group: ClassVar[str] = "pab.quantizers"


class TransformCall(PluginCall):
    """A model transform of a training stage: a `pab.transforms` plugin, or a gradient quantizer
    (`pab.quantizers`, such as psg), which is a transform too."""

    group: ClassVar[str] = "pab.transforms"
    also_groups: ClassVar[tuple[str, ...]] = ("pab.quantizers",)


# --------------------------------------------------------------------------- the spec
class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    progress: Literal["auto", "rich", "plain", "none"] = Field(
        "auto", description="Progress display: rich bars on a terminal, plain log lines otherwise."
    )
    loggers: list[Literal["jsonl", "tensorboard", "csv"]] = Field(
        default_factory=lambda: ["jsonl"],
        description="Where the train stage's per-epoch scalars go besides the stage directory's metrics.jsonl, which is "
        "always written (reports and caching read it): `tensorboard` (event files under tb/; needs the tensorboard extra), "
        "`csv` (metrics.csv).",
    )

    @field_validator("persistent_workers", "prefetch_factor")
    @classmethod
    def _needs_workers(cls, v, info):
        if v not in (None, False) and info.data.get("num_workers", 0) == 0:
            raise ValueError(f"{info.field_name} needs DataLoader workers (runtime.num_workers > 0)")
        return v

    @field_validator("loggers")
    @classmethod
    def _loggers_available(cls, v: list) -> list:
        from .loggers import check_available

        check_available(v)
        return list(dict.fromkeys(v))


class Source(StrictModel):
    """Where a stage takes its masks or weights from: an upstream `stage` (with `epoch`: the
    weights that train stage kept after that epoch, see its `keep_weights`), or a model.pt `path`."""

    stage: Optional[str] = Field(None, description="A stage of this spec (it runs first).")
    epoch: Optional[int] = Field(None, ge=0, le=100_000, description="With stage: its weights after this epoch (0: before training).")
    path: Optional[str] = Field(None, min_length=1, description="A model.pt file (relative to the spec file).")

    @model_validator(mode="after")
    def _one(self):
        if (self.stage is None) == (self.path is None):
            raise ValueError("give either stage or path")
        if self.epoch is not None and self.stage is None:
            raise ValueError("epoch goes with stage (the weights a train stage kept after that epoch)")
        return self


def _source(v: Any, special: str) -> Any:
    if isinstance(v, str) and v != special:
        return {"stage": v}
    return v


class StageSpec(BaseModel):
    """A stage: its `kind` (a stage plugin), the stages it runs `after`, where it takes its masks
    and weights from, and the kind's own keys."""

    model_config = ConfigDict(extra="allow")
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

    def dependencies(self) -> list[str]:
        """`after`, then the stages masks and weights come from: all of them run first."""
        out = list(self.after)
        for src in (self.masks_from, self.weights_from):
            if isinstance(src, Source) and src.stage is not None and src.stage not in out:
                out.append(src.stage)
        return out

    _entry: Any = PrivateAttr(default=None)
    _params: Any = PrivateAttr(default=None)

    @property
    def plugin(self) -> Any:
        return self._entry.obj

    @property
    def params(self) -> BaseModel:
        return self._params

    @model_serializer(mode="wrap")
    def _serialize(self, handler):
        data = handler(self)
        if self._params is not None:
            out = {"kind": self.kind, "after": list(self.after)}
            for k in ("masks_from", "weights_from"):
                if data.get(k) is not None:
                    out[k] = data[k]
            return {**out, **self._params.model_dump(mode="json")}
        return data


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

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def source(self) -> str:
        return self._source

    def problem(self, path: tuple, message: str) -> Problem:
        """A problem with the value at key path `path`, placed where that value came from (the
        spec file and line, or the --set that gave it)."""
        return _locate(path, message, self._source, self._loaded, self._overridden, self._remap)

    def resolve_path(self, p: str | Path) -> Path:
        p = Path(p).expanduser()
        return p if p.is_absolute() else (self._base_dir / p).resolve()

    @property
    def output_root(self) -> Path:
        return self.resolve_path(self.runtime.output_dir) / self.name

    def resolved_dict(self) -> dict:
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------- errors
def _unwrap(tp):
    """The model class a field annotation leads to (through Optional, list, dict), if any."""
    origin = get_origin(tp)
    if origin is Union:
        for a in get_args(tp):
            if a is not type(None):
                return _unwrap(a)
    if origin in (list, dict):
        return _unwrap(get_args(tp)[-1])
    return tp


def _fields(cur: Any) -> dict | None:
    if isinstance(cur, _FieldSet) or (isinstance(cur, type) and issubclass(cur, BaseModel)):
        return cur.model_fields
    return None


def _known_keys(model: Any, loc: tuple) -> list[str] | None:
    """The keys allowed at `loc` inside `model`, for 'did you mean' hints."""
    cur: Any = model
    for part in loc:
        fields = _fields(cur)
        if isinstance(part, int) or fields is None:
            if fields is None and not isinstance(part, int):
                return None
            continue
        if part not in fields:
            return None
        cur = _unwrap(fields[part].annotation)
    fields = _fields(cur)
    return list(fields) if fields is not None else None


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def problems_from_validation(err: ValidationError, prefix: tuple, model: type[BaseModel] | None) -> list[tuple[tuple, str]]:
    out = []
    for e in err.errors(include_url=False):
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        typ = e["type"]
        if typ == "extra_forbidden":
            key = loc[-1] if loc else "?"
            msg = f"unknown key {key!r}"
            known = _known_keys(model, loc[:-1]) if model is not None else None
            if known:
                close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
                if close:
                    msg += f"; did you mean {close[0]!r}?"
                msg += f" Allowed here: {', '.join(known)}"
        elif typ == "missing":
            msg = "required key is missing"
            parent = e.get("input")
            if isinstance(parent, dict) and loc:
                close = difflib.get_close_matches(str(loc[-1]), [str(k) for k in parent], n=1, cutoff=0.6)
                if close:
                    msg += f"; is {close[0]!r} a misspelling of {loc[-1]!r}?"
        else:
            msg = e["msg"]
            if "input" in e and typ not in ("model_type", "dict_type"):
                msg += f" (got {_short(e['input'])})"
            elif typ in ("model_type", "dict_type"):
                msg += f" (got {type(e.get('input')).__name__})"
        out.append((prefix + loc, msg))
    return out


# --------------------------------------------------------------------------- overrides
def parse_override(assignment: str) -> tuple[str, Any]:
    """`a.b.c=value` (the value read as YAML) as (key path, value): the one parser of `--set`."""
    if "=" not in assignment:
        raise SpecError([Problem((), f"override {assignment!r} must look like key.path=value", None, "--set")])
    key, raw = assignment.split("=", 1)
    return key.strip(), parse_scalar(raw)


def apply_override(data: dict, assignment: str) -> tuple:
    """Apply `a.b.c=value` to a spec dict in place; returns the key path set."""
    key, value = parse_override(assignment)
    return set_path(data, key, value, assignment)


def set_path(data: dict, key: str, value: Any, label: str | None = None) -> tuple:
    """Set the dotted key path `key` (list indices as numbers) to `value` in place, creating
    missing mappings; returns the key path set. `label` names the override in errors."""
    assignment = label if label is not None else key
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(p == "" for p in parts):
        raise SpecError([Problem((), f"override {assignment!r} has an empty key", None, "--set")])
    path: list = []
    cur: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(cur, list):
            if not part.lstrip("-").isdigit() or not -len(cur) <= int(part) < len(cur):
                raise SpecError([Problem(tuple(path), f"override {assignment!r}: {part!r} is not an index of this list", None, "--set")])
            idx: Any = int(part)
        elif isinstance(cur, dict):
            idx = part
        else:
            raise SpecError([Problem(tuple(path), f"override {assignment!r}: {'.'.join(map(str, path))} is not a mapping", None, "--set")])
        path.append(idx)
        if last:
            cur[idx] = copy.deepcopy(value)
        else:
            if isinstance(cur, dict) and (idx not in cur or cur[idx] is None):
                cur[idx] = {}
            cur = cur[idx]
    return tuple(path)


# --------------------------------------------------------------------------- loading
class _Resolver:
    """Resolves every plugin call of a spec (registry look-up, the plugin's own `Params`) and
    collects every problem on the way instead of stopping at the first: a section that does not
    validate is still searched for the plugin calls inside it, so a misspelt pruner name is
    reported together with a bad density beside it."""

    def __init__(self, reg: Registry):
        self.reg = reg
        self.problems: list[tuple[tuple, str]] = []
        self.resolved: list[tuple[Any, BaseModel, tuple]] = []  # (plugin, params, where in the spec)

    def call(self, call: PluginCall, loc: tuple) -> None:
        try:
            entry = self.reg.get_any(call.groups(), call.name)
        except PluginError as e:
            self.problems.append((loc + ("name",), e.message))
            return
        params = self._params(entry, call.plugin_keys(), loc, type(call))
        if params is not None:
            call._entry, call._params = entry, params

    def _params(self, entry, keys: dict, loc: tuple, base: type[BaseModel]):
        """The plugin's `Params` from `keys`, walked for nested calls; None (problems noted, and the
        calls nested in the raw keys checked anyway) when they do not validate."""
        try:
            params = entry.Params.model_validate(keys)
        except ValidationError as err:
            self.problems += problems_from_validation(err, loc, _merged_model(base, entry.Params))
            self.raw_fields(entry.Params, keys, loc)
            return None
        self.resolved.append((entry.obj, params, loc))
        self.walk(params, loc)
        return params

    def combination_problems(self, spec: "ExperimentSpec") -> list[tuple[tuple, str]]:
        """A plugin may refuse a combination with the rest of the spec that it cannot run
        correctly: its optional `spec_problems(params, spec)` returns (key path below its own
        section, message) pairs."""
        out = []
        for plugin, params, loc in self.resolved:
            check = getattr(plugin, "spec_problems", None)
            if callable(check):
                out += [(loc + tuple(rel), msg) for rel, msg in check(params, spec)]
        return out

    def walk(self, obj: Any, loc: tuple) -> None:
        """Resolve every plugin call nested inside a validated model."""
        if isinstance(obj, PluginCall):
            self.call(obj, loc)
        elif isinstance(obj, BaseModel):
            for fname in type(obj).model_fields:
                self.walk(getattr(obj, fname), loc + (fname,))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                self.walk(v, loc + (k,))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                self.walk(v, loc + (i,))

    def stage(self, sid: str, st: StageSpec) -> None:
        loc = ("stages", sid)
        try:
            entry = self.reg.get("pab.stages", st.kind)
        except PluginError as e:
            self.problems.append((loc + ("kind",), e.message))
            return
        params = self._params(entry, dict(st.model_extra or {}), loc, StageSpec)
        if params is not None:
            st._entry, st._params = entry, params

    # ------------------------------------------------------------------ sections that did not validate
    def raw_spec(self, data: Any) -> None:
        """The plugin calls of a spec dict whose structure did not validate, checked as far as they can be."""
        if not isinstance(data, dict):
            return
        self.raw_call(ModelCall, data.get("model"), ("model",))
        self.raw_call(DataCall, data.get("data"), ("data",))
        stages = data.get("stages")
        for sid, st in (stages.items() if isinstance(stages, dict) else ()):
            if isinstance(st, dict) and isinstance(st.get("kind"), str):
                try:
                    entry = self.reg.get("pab.stages", st["kind"])
                except PluginError as e:
                    self.problems.append((("stages", sid, "kind"), e.message))
                    continue
                self._params(entry, {k: v for k, v in st.items() if k not in StageSpec.model_fields}, ("stages", sid), StageSpec)

    def raw_call(self, cls: type[PluginCall], raw: Any, loc: tuple) -> None:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            return  # not a plugin call at all: the enclosing model's validation said so
        try:
            call = cls.model_validate(raw)
        except ValidationError:  # its framework keys (density, ...): reported by the enclosing model
            call = None
        if call is not None:
            self.call(call, loc)
            return
        try:
            entry = self.reg.get(cls.group, raw["name"])
        except PluginError as e:
            self.problems.append((loc + ("name",), e.message))
            return
        self._params(entry, {k: v for k, v in raw.items() if k not in cls.model_fields}, loc, cls)

    def raw_fields(self, model: type[BaseModel], raw: dict, loc: tuple) -> None:
        """The plugin calls inside the raw keys of a model that did not validate."""
        for fname, field in model.model_fields.items():
            if fname not in raw:
                continue
            found = _model_in(field.annotation)
            if found is None:
                continue
            sub, shape = found
            value = raw[fname]
            items = (list(enumerate(value)) if shape == "list" and isinstance(value, list)
                     else list(value.items()) if shape == "dict" and isinstance(value, dict)
                     else [(None, value)] if shape == "one" else [])
            for k, v in items:
                where = loc + (fname,) + (() if k is None else (k,))
                if issubclass(sub, PluginCall):
                    self.raw_call(sub, v, where)
                elif isinstance(v, dict):
                    self.raw_fields(sub, v, where)


def _model_in(tp: Any, shape: str = "one") -> tuple[type[BaseModel], str] | None:
    """The pydantic model a field annotation holds, and how: one, a list or a dict of them."""
    import types

    origin = get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        for a in get_args(tp):
            if a is not type(None):
                found = _model_in(a, shape)
                if found is not None:
                    return found
        return None
    if origin is list and shape == "one":
        return _model_in(get_args(tp)[0], "list") if get_args(tp) else None
    if origin is dict and shape == "one":
        return _model_in(get_args(tp)[-1], "dict") if get_args(tp) else None
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp, shape
    return None


class _FieldSet:
    """The framework's and a plugin's fields together: what may stand in one section."""

    def __init__(self, *models: type[BaseModel]):
        self.model_fields: dict = {}
        for m in models:
            self.model_fields.update(m.model_fields)


def _merged_model(base: type[BaseModel], params: type[BaseModel]) -> _FieldSet:
    return _FieldSet(base, params)


def _check_refs(refs: dict) -> list[tuple[tuple, str]]:
    """Stage references (`refs`: stage id -> [(key path, stage it names)]) to stages that are not
    in the spec, or to the stage itself."""
    problems = []
    ids = list(refs)
    for sid, deps in refs.items():
        for loc, dep in deps:
            if dep not in refs:
                close = difflib.get_close_matches(dep, ids, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                what = "runs after" if loc[2] == "after" else f"takes its {loc[2].split('_')[0]} from"
                problems.append((loc, f"stage {sid!r} {what} {dep!r}, which is not a stage of this spec{hint} Stages: {', '.join(ids)}"))
            elif dep == sid:
                problems.append((loc, f"stage {sid!r} cannot depend on itself"))
    return problems


def _check_graph(spec: ExperimentSpec) -> list[tuple[tuple, str]]:
    refs = {}
    for sid, st in spec.stages.items():
        refs[sid] = [(("stages", sid, "after", i), dep) for i, dep in enumerate(st.after)]
        for key in ("masks_from", "weights_from"):
            src = getattr(st, key)
            if isinstance(src, Source) and src.stage is not None:
                refs[sid].append((("stages", sid, key, "stage"), src.stage))
    problems = _check_refs(refs)
    if problems:
        return problems
    problems += _check_kept_weights(spec)
    from .graph import find_cycle

    cycle = find_cycle({sid: st.dependencies() for sid, st in spec.stages.items()})
    if cycle:
        problems.append((("stages", cycle[0], "after"), "the stages form a cycle: " + " -> ".join(cycle + [cycle[0]])))
    return problems


def _raw_graph(data: Any) -> list[tuple[tuple, str]]:
    """`after:` references of a spec dict whose structure did not validate, where they can be read."""
    raw = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(raw, dict):
        return []
    after = {sid: (st.get("after") or []) if isinstance(st, dict) else [] for sid, st in raw.items()}
    if not all(isinstance(sid, str) and isinstance(a, list) and all(isinstance(x, str) for x in a) for sid, a in after.items()):
        return []  # a graph that does not parse: its structure problems say why
    return _check_refs({sid: [(("stages", sid, "after", i), dep) for i, dep in enumerate(a)] for sid, a in after.items()})


def _check_kept_weights(spec: ExperimentSpec) -> list[tuple[tuple, str]]:
    """Rewinding (`weights_from: {stage, epoch}`) needs that stage to keep the weights of that epoch."""
    problems = []
    for sid, st in spec.stages.items():
        src = st.weights_from
        if not isinstance(src, Source) or src.epoch is None or src.stage not in spec.stages:
            continue
        up = spec.stages[src.stage]
        if up.params is None:  # its own section is invalid: reported already
            continue
        kept = getattr(up.params, "keep_weights", None)
        loc = ("stages", sid, "weights_from", "epoch")
        if kept is None:
            problems.append((loc, f"stage {src.stage!r} ({up.kind}) keeps no weights per epoch: rewinding needs a stage with keep_weights"))
        elif src.epoch not in kept:
            problems.append((loc, f"stage {src.stage!r} keeps no weights after epoch {src.epoch} (its keep_weights: {list(kept)}); "
                                  f"add {src.epoch} to stages.{src.stage}.keep_weights"))
    return problems


def _check_source_files(spec: ExperimentSpec) -> list[tuple[tuple, str]]:
    """Masks and weights from a file (`{path: ...}`): it exists, is a pab model artifact, and its
    masks and weights have the shapes of the spec's model."""
    problems: list[tuple[tuple, str]] = []
    model_shapes: dict | None = None
    for sid, st in spec.stages.items():
        for key in ("masks_from", "weights_from"):
            src = getattr(st, key)
            if not isinstance(src, Source) or src.path is None:
                continue
            loc = ("stages", sid, key, "path")
            path = spec.resolve_path(src.path)
            if not path.is_file():
                problems.append((loc, f"{path} not found (the path is relative to the spec file)"))
                continue
            from . import artifacts
            from .errors import ArtifactError, DataError

            try:
                state, masks = artifacts.load_model_artifact(path)
            except ArtifactError as e:
                problems.append((loc, e.message))
                continue
            if model_shapes is None:
                from .modelutil import build_model

                try:
                    info = spec.data.plugin.info(spec.data.params, base_dir=spec.base_dir)
                except DataError:  # the model's shape needs data that is missing: reported when the run starts
                    continue
                model_shapes = {k: tuple(v.shape) for k, v in build_model(spec.model, info, spec.seed).state_dict().items()}
            table = masks if key == "masks_from" else state
            what = "mask" if key == "masks_from" else "weight"
            for name, t in table.items():
                want = model_shapes.get(name)
                if want is None or tuple(t.shape) != want:
                    problems.append((loc, f"{path}: {what} {name!r} has shape {tuple(t.shape)}, but the model {spec.model.name!r} "
                                          + (f"has {want} there" if want is not None else "has no such parameter")))
                    break
    return problems


def _finite_problems(data: Any, path: tuple = ()) -> list[tuple[tuple, str]]:
    out = []
    if isinstance(data, dict):
        for k, v in data.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                out.append((path, f"key {k!r} must be text"))
            out += _finite_problems(v, path + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _finite_problems(v, path + (i,))
    elif isinstance(data, float) and not math.isfinite(data):
        out.append((path, f"must be a finite number (got {data})"))
    return out


def _locate(path: tuple, message: str, source: str, loaded: LoadedYaml | None, overridden: dict, remap: dict | None = None) -> Problem:
    """A Problem at key path `path`: from the --set that set it (or a mapping above it), else the
    file's line (of the block a repeated stage was expanded from)."""
    written = original_path(path, remap) if remap else tuple(path)
    over = next((a for p, a in overridden.items() if tuple(written[: len(p)]) == p), None)
    if over is not None:
        return Problem(path, message, None, f"--set {over}")
    return Problem(path, message, loaded.line_of(written) if loaded else None, source)


def _without_nonfinite(data: Any) -> Any:
    """`data` with every non-finite number replaced by None and every key that is not text left
    out (both already reported): nothing downstream reports them again or has to cope with them."""
    if isinstance(data, dict):
        return {k: _without_nonfinite(v) for k, v in data.items() if isinstance(k, (str, int)) and not isinstance(k, bool)}
    if isinstance(data, list):
        return [_without_nonfinite(v) for v in data]
    return None if isinstance(data, float) and not math.isfinite(data) else data


def spec_from_dict(
    data: dict,
    *,
    source: str = "<spec>",
    loaded: LoadedYaml | None = None,
    overridden: dict[tuple, str] | None = None,
    base_dir: Path | None = None,
    reg: Registry | None = None,
) -> ExperimentSpec:
    """Validate a spec dict completely (structure, every plugin's parameters, the stage graph)."""
    reg = reg or default_registry()
    overridden = overridden or {}

    remap: dict[tuple, tuple] = {}

    def fail(items: list[tuple[tuple, str]]):
        probs = [_locate(path, msg, source, loaded, overridden, remap) for path, msg in items]
        probs.sort(key=lambda p: (p.line is None, p.line or 0))  # in the order they stand in the file
        raise SpecError(probs)

    data, remap, bad = expand(data)  # vars: and repeated stage blocks
    if bad:
        fail(bad)
    # every problem in one go: non-finite numbers, the structure, every plugin section, the graph
    bad = _finite_problems(data)
    if bad:  # each named once; the flagged values are left out of what is validated next
        data = _without_nonfinite(data)
    res = _Resolver(reg)
    spec: ExperimentSpec | None = None
    try:
        spec = ExperimentSpec.model_validate(data)
    except ValidationError as err:
        structure = problems_from_validation(err, (), ExperimentSpec)
        res.raw_spec(data)
        graph = _raw_graph(data)
    else:
        structure = []
        res.call(spec.model, ("model",))
        res.call(spec.data, ("data",))
        for sid, st in spec.stages.items():
            res.stage(sid, st)
        graph = _check_graph(spec)
    flagged = {p for p, _ in bad}
    problems = list(dict.fromkeys(bad + [(p, m) for p, m in structure + res.problems + graph if p not in flagged]))
    if not problems and spec is not None:
        problems = res.combination_problems(spec)
    if problems or spec is None:
        fail(problems)
    spec._base_dir = base_dir if base_dir is not None else Path(".")
    spec._source = source
    spec._loaded, spec._overridden, spec._remap = loaded, dict(overridden), dict(remap)
    problems = _check_source_files(spec)
    if problems:
        fail(problems)
    return spec


def load_spec(path: str | Path, overrides: list[str] | None = None, reg: Registry | None = None) -> ExperimentSpec:
    path = Path(path)
    loaded = load_yaml_file(path)
    data = copy.deepcopy(loaded.data)
    overridden: dict[tuple, str] = {}
    for a in overrides or []:
        overridden[apply_override(data, a)] = a
    return spec_from_dict(data, source=str(path), loaded=loaded, overridden=overridden, base_dir=path.resolve().parent, reg=reg)


def load_spec_text(text: str, source: str = "<spec>", base_dir: Path | None = None) -> ExperimentSpec:
    loaded = load_yaml_text(text, source)
    return spec_from_dict(copy.deepcopy(loaded.data), source=source, loaded=loaded, base_dir=base_dir)


# --------------------------------------------------------------------------- keys
def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def digest(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()
