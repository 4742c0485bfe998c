"""The plugin contracts: what each kind of plugin provides, in one file.

A plugin is a class that the registry instantiates once (no arguments) and finds through the
entry-point group of its kind. Each kind is a `typing.Protocol` below, naming every member a
plugin of that kind may have:

- REQUIRED: `Params` and the methods without `@optional`; a plugin that lacks one is listed as
  broken by `pab plugins`, with the reason, and the other plugins keep working.
- OPTIONAL: the methods marked `@optional` and the attributes given a value; the body (or the
  value) is the default, what the engine does for a plugin without that hook.

The registry checks every plugin against its kind's contract when it loads it, and hands the
engine a `BoundPlugin`: the plugin seen through its contract, on which every hook exists (the
plugin's own or the default), so no other module asks a plugin whether it has a hook.

A new kind of plugin is one more Protocol here, registered with `@kind(name, group)`.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from pydantic import BaseModel


def optional(fn: Callable) -> Callable:
    """Mark a contract's method as an optional hook: its body is the default."""
    fn.__optional_hook__ = True
    return fn


@dataclass(frozen=True)
class Contract:
    """A kind's contract, read off its Protocol: what the registry checks and binds."""

    kind: str  # short name: "pruner"
    group: str  # entry-point group: "pab.pruners"
    protocol: type
    required: tuple[str, ...]  # methods every plugin of the kind has
    defaults: dict[str, Any]  # optional hook -> its default (a function, or a value)


CONTRACTS: dict[str, Contract] = {}  # entry-point group -> contract, in the order the kinds are declared
GROUPS: dict[str, str] = {}  # kind -> entry-point group ("pruner": "pab.pruners")


def kind(name: str, group: str) -> Callable[[type], type]:
    """Register a Protocol as the contract of the plugins in entry-point group `group`."""

    def register(protocol: type) -> type:
        required: list[str] = []
        defaults: dict[str, Any] = {}
        for cls in reversed(protocol.__mro__):
            if not cls.__dict__.get("_is_protocol") or cls is Protocol:
                continue
            for member, value in cls.__dict__.items():
                if member.startswith("_"):
                    continue
                if isinstance(value, types.FunctionType) and not getattr(value, "__optional_hook__", False):
                    required.append(member)
                else:
                    defaults[member] = value
        CONTRACTS[group] = Contract(name, group, protocol, tuple(dict.fromkeys(required)), defaults)
        GROUPS[name] = group
        return protocol

    return register


def kind_name(group: str) -> str:
    """The short name of a group's kind ("pruner"), or the group itself when it has no contract."""
    c = CONTRACTS.get(group)
    return c.kind if c is not None else group


# --------------------------------------------------------------------------- the kinds
class Plugin(Protocol):
    """What every plugin has, whatever its kind."""

    Params: type[BaseModel]
    """Its parameters: a pydantic model with `extra="forbid"`, so that a misspelled key is an
    error naming the key, its path in the spec, and the file and line. In a spec these are the
    keys beside `name:` (or a stage's `kind:`), less the framework's own keys of that section."""

    @optional
    def spec_problems(self, params: BaseModel, spec: Any) -> list[tuple[tuple, str]]:
        """Settings that cannot work with the rest of the spec (`spec`, an `ExperimentSpec`
        whose every section validated): (key path below the plugin's own section, message)
        pairs, reported as any other spec problem, with file, line and key path."""
        return []


@kind("model", "pab.models")
class ModelPlugin(Plugin, Protocol):
    """A network architecture."""

    def build(self, params: BaseModel, num_classes: int, input_shape: tuple[int, ...]) -> Any:
        """The `nn.Module`, built under the experiment's seed; its Conv2d and Linear weights are
        the prunable ones (a spec's `init:` re-draws them afterwards)."""


@kind("dataset", "pab.datasets")
class DatasetPlugin(Plugin, Protocol):
    """A data set: its shape, and its splits as torch Datasets."""

    def info(self, params: BaseModel, *, base_dir: Optional[Path] = None) -> Any:
        """A `pab_framework.data.DataInfo` (num_classes, input_shape, mean, std). `base_dir`: the
        spec file's folder, for relative paths."""

    def build(self, params: BaseModel, split: str, *, base_dir: Optional[Path] = None) -> Any:
        """A torch `Dataset` of `split` ("train" or "val"); a `TensorDataset` gets the fast
        on-device batching. Raises `pab_framework.errors.DataError` when the data is missing."""

    @optional
    def check(self, params: BaseModel, splits: tuple[str, ...], *, base_dir: Optional[Path] = None) -> None:
        """Raise `DataError(message, key=...)` when the data of `splits` is not where `params`
        say (`key`: the parameter at fault, so the message names its line); quick (files and
        folders, no checksums). Called once before the first stage runs, with the splits the
        stages to run read (possibly none). Default: no check; `build` then says what is missing."""
        return None


@kind("pruner", "pab.pruners")
class PrunerPlugin(Plugin, Protocol):
    """A pruning criterion: scores; density, schedule, scope and iterations are the framework's
    (`pab_framework.masking`)."""

    needs_data: bool = True
    """Whether `score` reads batches of training data (`inputs.batches`); False: the prune stage
    loads none, and its data check asks for no split."""

    linearized: bool = False
    """Score the network with every parameter and buffer made non-negative (SynFlow's
    linearisation), done once by the framework."""

    def score(self, params: BaseModel, model: Any, prunable: dict[str, Any], inputs: Any) -> dict[str, Any]:
        """`{parameter name: scores}` (the weights' shapes; higher = keep). `model` is a float64
        copy with the current masks applied, `prunable` maps names to weights, `inputs` is a
        `pab_framework.masking.PruneInputs`; the scores may be written into
        `inputs.scores_out[name]` and returned, saving a copy per round."""


@kind("optimizer", "pab.optimizers")
class OptimizerPlugin(Plugin, Protocol):
    """An optimizer of a train stage."""

    def build(self, params: BaseModel, octx: Any) -> Any:
        """A `pab_framework.optim.TrainOptimizer` for the parameters of `octx`, a
        `pab_framework.optim.OptimizerContext` (named_params, masks, epochs, steps_per_epoch)."""


class _ModelTransform(Plugin, Protocol):
    def apply(self, model: Any, params: BaseModel, tctx: Any) -> Any:
        """Change the model in place (swap or wrap layers, add parameters) and return None, or
        return a new one. `tctx` is a `pab_framework.transforms.TransformContext` (masks,
        device, seed, add_callback)."""


@kind("quantizer", "pab.quantizers")
class QuantizerPlugin(_ModelTransform, Protocol):
    """A gradient quantizer (PSG): a model transform, a train stage's first (`quantizer:`)."""


@kind("transform", "pab.transforms")
class TransformPlugin(_ModelTransform, Protocol):
    """A model transform of a train stage (`transforms:`), applied in order."""


@kind("stage", "pab.stages")
class StagePlugin(Plugin, Protocol):
    """A stage kind: prune, train, evaluate, or a package's own."""

    runtime_in_key: bool = False
    """Whether the default `key` holds the numerics of `runtime` (AMP, a per-rank batch)."""

    def run(self, ctx: Any) -> dict:
        """Run the stage with `ctx`, a `pab_framework.context.StageContext`; return a JSON-able
        dict, which becomes result.json."""

    @optional
    def key(self, view: Any) -> dict:
        """What the stage's result depends on, from `view`, a `pab_framework.keys.KeyView`; it is
        hashed into the stage's content key. Default: everything a stage may read."""
        return view.default(runtime=self.runtime_in_key)

    @optional
    def data_splits(self, params: BaseModel) -> tuple[str, ...]:
        """The data splits the stage reads when it runs, checked before the first stage starts."""
        return ("train", "val")

    @optional
    def kept_epochs(self, params: BaseModel) -> Optional[list[int]]:
        """The epochs after which the stage keeps the model's weights (0: before training), which
        later stages may start from (`weights_from: {stage: <this>, epoch: k}`); None: it keeps none."""
        return None


@kind("exporter", "pab.exporters")
class ExporterPlugin(Plugin, Protocol):
    """A file format for the network a stage found (`pab export`; docs/export.md)."""

    suffix: str = ".bin"
    """The file name's ending: `pab export` writes `<stage dir>/model<suffix>` by default."""

    readable: bool = False
    """Whether `pab_framework.load` reads this format back (with `sniff` and `load`)."""

    def write(self, params: BaseModel, src: Any, path: Path) -> str:
        """Write the network of `src` (a `pab_framework.export.ExportSource`) to `path`,
        atomically; return a short note for the table `pab export` prints."""

    @optional
    def encode(self, params: BaseModel, src: Any) -> bytes:
        """The file's bytes without keeping a file (for sizes in reports). Default: written to a
        temporary file by `write` and read back."""
        import tempfile  # only for a format without an encoder of its own

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"model{self.suffix}"
            self.write(params, src, path)
            return path.read_bytes()

    @optional
    def sniff(self, path: Path) -> bool:
        """Whether the file at `path` is one this format reads back (`load`). Default: never."""
        return False

    @optional
    def load(self, params: BaseModel, path: Path) -> Any:
        """The `nn.Module` a file of this format holds, in eval mode (asked only when `sniff` says yes)."""
        raise NotImplementedError


@kind("logger", "pab.loggers")
class LoggerPlugin(Plugin, Protocol):
    """A tracker (MLflow, Weights & Biases, TensorBoard, a CSV file): where a training stage's
    figures go besides its metrics.jsonl (`runtime.loggers`).

    The engine (`pab_framework.tracking`) calls these hooks on rank 0 only, from a thread of the
    tracker's own, never from the training loop: a slow tracker does not slow training, and one
    that raises gets one warning and is left out for the rest of the run. A tracker keeps no state
    of its own: what `connect` and `start` return is handed back to its other hooks. A tracker
    whose package is missing says so in `spec_problems` (`tracking.needs_package`), so that the
    spec is refused with the install command before anything runs."""

    @optional
    def connect(self, params: BaseModel, scope: Any) -> Any:
        """Reach the tracker once per run of a spec, before its first stage computes (import the
        package, open the store); `scope` is a `pab_framework.tracking.TrackerScope` (experiment,
        output_dir, base_dir, group). What it returns is passed to `start`. Default: None."""
        return None

    def start(self, params: BaseModel, conn: Any, run: Any) -> Any:
        """Begin the tracker's run of one training stage, or continue it when `run.resume_id` is
        the id `run_id` gave in an interrupted session of the stage. `run` is a
        `pab_framework.tracking.TrackedRun`: name, experiment, group, the stage directory, `params`
        (the resolved spec as flattened key paths), `tags` (stage, kind, key, seed, grid axes).
        Returns the run's handle, which the other hooks receive."""

    def log_epochs(self, params: BaseModel, handle: Any, epochs: list) -> None:
        """The figures of one or more epochs that ended, each a `pab_framework.tracking.Epoch`:
        `epoch` (1-based: the step), `scalars` (every number of its metrics.jsonl line) and
        `layers` (its per-layer figures, `{table: {layer: {column: value}}}`). In order and each
        epoch once, across resumes too; the epochs that end within the entry's `every_s` of the
        last call come together in the next one."""

    @optional
    def log_artifacts(self, params: BaseModel, handle: Any, files: list[Path]) -> None:
        """The stage's files once it is complete (spec.yaml, model.pt, result.json). Default: not kept."""
        return None

    @optional
    def finish(self, params: BaseModel, handle: Any, status: str) -> None:
        """End the run with `status`: FINISHED, FAILED (an error ended the stage) or KILLED (a stop
        signal ended it; running the command again resumes it). Default: nothing to end."""
        return None

    @optional
    def run_id(self, params: BaseModel, handle: Any) -> Optional[str]:
        """The tracker's id of the run, kept in the stage directory so that a resumed stage
        continues the same run. Default: None (a resumed stage starts a new one)."""
        return None


# --------------------------------------------------------------------------- checking and binding
def problem(group: str, obj: Any) -> str | None:
    """Why `obj` breaks the contract of `group` (no pydantic `Params`, a required method missing,
    a hook that is not a method), or None."""
    params = getattr(obj, "Params", None)
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        return f"its Params is {params!r}, not a pydantic model"
    contract = CONTRACTS.get(group)
    if contract is None:
        return None
    for method in contract.required:
        if not callable(getattr(obj, method, None)):
            return f"it has no {method}() method, which every plugin in {group} must provide"
    for hook, default in contract.defaults.items():
        if callable(default) and hasattr(obj, hook) and not callable(getattr(obj, hook)):
            return f"its {hook} is not a method, which the {group} hook {hook}() must be"
    return None


class BoundPlugin:
    """A plugin seen through its kind's contract: every member of the contract exists on it,
    the plugin's own or the contract's default; any other attribute is the plugin's. Its own:
    `plugin` (the object as its package made it), `name` (its registered name), `contract`."""

    def __init__(self, contract: Contract, plugin: Any, name: str | None = None):
        self.__dict__.update(contract=contract, plugin=plugin, name=name or type(plugin).__name__)
        for method in contract.required:
            self.__dict__[method] = getattr(plugin, method)
        for hook, default in contract.defaults.items():
            if hasattr(plugin, hook):
                self.__dict__[hook] = getattr(plugin, hook)
            else:
                self.__dict__[hook] = types.MethodType(default, self) if callable(default) else default

    def __getattr__(self, attr: str) -> Any:  # only what the contract does not name
        plugin = self.__dict__.get("plugin")
        if plugin is None or attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(plugin, attr)

    def __reduce__(self):  # pickled and copied as the plugin it binds
        return bind, (self.contract.group, self.plugin, self.name)

    def __repr__(self) -> str:
        return f"<{self.contract.kind} plugin {self.name!r}: {self.plugin!r}>"


def bind(group: str, plugin: Any, name: str | None = None) -> Any:
    """`plugin` (a plugin object of `group`'s kind, or one bound already) as a `BoundPlugin`.
    `name`: its registered name, for messages (default: its class name)."""
    if isinstance(plugin, BoundPlugin):
        return plugin
    return BoundPlugin(CONTRACTS[group], plugin, name)
