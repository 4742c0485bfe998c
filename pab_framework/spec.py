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

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_serializer

from .errors import Problem, SpecError, PluginError
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
    name: str = Field(description="Which plugin; `pab plugins` lists the installed ones.")

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
        None, gt=0, le=1, description="A separate kept fraction for the final classifier layer (default: as the others)."
    )
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


class OptimizerCall(PluginCall):
    group: ClassVar[str] = "pab.optimizers"


class QuantizerCall(PluginCall):
    group: ClassVar[str] = "pab.quantizers"


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


class StageSpec(BaseModel):
    """A stage: its `kind` (a stage plugin), the stages it runs `after`, and the kind's own keys."""

    model_config = ConfigDict(extra="allow")
    kind: str = Field(description="Stage kind: prune, train, evaluate, or a plugin's.")
    after: list[str] = Field(default_factory=list, description="Stages whose artifacts this stage starts from.")

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
            return {"kind": self.kind, "after": list(self.after), **self._params.model_dump(mode="json")}
        return data


class ExperimentSpec(StrictModel):
    name: str = Field(..., pattern=NAME_PATTERN, max_length=128, description="Experiment name; runs go to <output_dir>/<name>/.")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Seed of initialisation, pruning and data order.")
    model: ModelCall
    data: DataCall
    stages: dict[str, StageSpec] = Field(..., min_length=1)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)

    # where the spec came from: relative paths in it resolve against this directory
    _base_dir: Path = PrivateAttr(default=Path("."))
    _source: str = PrivateAttr(default="<spec>")

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
def apply_override(data: dict, assignment: str) -> tuple:
    """Apply `a.b.c=value` to a spec dict in place; returns the key path set."""
    if "=" not in assignment:
        raise SpecError([Problem((), f"override {assignment!r} must look like key.path=value", None, "--set")])
    key, raw = assignment.split("=", 1)
    return set_path(data, key, parse_scalar(raw), assignment)


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
    def __init__(self, reg: Registry):
        self.reg = reg
        self.problems: list[tuple[tuple, str]] = []
        self.resolved: list[tuple[Any, BaseModel, tuple]] = []  # (plugin, params, where in the spec)

    def call(self, call: PluginCall, loc: tuple) -> None:
        try:
            entry = self.reg.get(call.group, call.name)
        except PluginError as e:
            self.problems.append((loc + ("name",), e.message))
            return
        try:
            params = entry.Params.model_validate(call.plugin_keys())
        except ValidationError as err:
            self.problems += problems_from_validation(err, loc, _merged_model(type(call), entry.Params))
            return
        call._entry, call._params = entry, params
        self.resolved.append((entry.obj, params, loc))
        self.walk(params, loc)

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
        keys = dict(st.model_extra or {})
        try:
            params = entry.Params.model_validate(keys)
        except ValidationError as err:
            self.problems += problems_from_validation(err, loc, _merged_model(StageSpec, entry.Params))
            return
        st._entry, st._params = entry, params
        self.walk(params, loc)


class _FieldSet:
    """The framework's and a plugin's fields together: what may stand in one section."""

    def __init__(self, *models: type[BaseModel]):
        self.model_fields: dict = {}
        for m in models:
            self.model_fields.update(m.model_fields)


def _merged_model(base: type[BaseModel], params: type[BaseModel]) -> _FieldSet:
    return _FieldSet(base, params)


def _check_graph(spec: ExperimentSpec) -> list[tuple[tuple, str]]:
    problems = []
    ids = list(spec.stages)
    for sid, st in spec.stages.items():
        for i, dep in enumerate(st.after):
            if dep not in spec.stages:
                close = difflib.get_close_matches(dep, ids, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                problems.append((("stages", sid, "after", i), f"stage {sid!r} runs after {dep!r}, which is not a stage of this spec{hint} Stages: {', '.join(ids)}"))
            elif dep == sid:
                problems.append((("stages", sid, "after", i), f"stage {sid!r} cannot run after itself"))
    if problems:
        return problems
    from .graph import find_cycle

    cycle = find_cycle({sid: list(st.after) for sid, st in spec.stages.items()})
    if cycle:
        problems.append((("stages", cycle[0], "after"), "the stages form a cycle: " + " -> ".join(cycle + [cycle[0]])))
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

    def fail(items: list[tuple[tuple, str]]):
        probs = []
        for path, msg in items:
            over = next((a for p, a in overridden.items() if path[: len(p)] == p), None)
            if over is not None:
                probs.append(Problem(path, msg, None, f"--set {over}"))
            else:
                probs.append(Problem(path, msg, loaded.line_of(path) if loaded else None, source))
        raise SpecError(probs)

    bad = _finite_problems(data)
    if bad:
        fail(bad)
    try:
        spec = ExperimentSpec.model_validate(data)
    except ValidationError as err:
        fail(problems_from_validation(err, (), ExperimentSpec))
    res = _Resolver(reg)
    res.call(spec.model, ("model",))
    res.call(spec.data, ("data",))
    for sid, st in spec.stages.items():
        res.stage(sid, st)
    problems = res.problems + _check_graph(spec)
    if not problems:
        problems = res.combination_problems(spec)
    if problems:
        fail(problems)
    spec._base_dir = base_dir if base_dir is not None else Path(".")
    spec._source = source
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
