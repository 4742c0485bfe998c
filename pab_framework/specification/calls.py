"""The spec's plugin sections: a `name:` (or a stage's `kind:`) that picks a plugin, beside the
framework's own keys of that section; every other key is the plugin's, validated by its `Params`."""
from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_serializer, model_validator

from ..masking import MaskPolicy, density_at


class PluginSection(BaseModel):
    """A section of the spec that picks a plugin: the key `name_key` names it, in the entry-point
    groups `groups()`. Keys declared on the subclass are the framework's; the others are the
    plugin's. Once the spec is resolved, `plugin` is the plugin (seen through its contract,
    `pab_framework.contracts`) and `params` its validated `Params`; serialised, the section is its
    framework keys and the plugin's parameters with their defaults."""

    model_config = ConfigDict(extra="allow")
    name_key: ClassVar[str] = "name"
    group: ClassVar[str] = ""
    also_groups: ClassVar[tuple[str, ...]] = ()  # further entry-point groups searched for the name, in order
    omit_if_none: ClassVar[tuple[str, ...]] = ()  # framework keys left out of the resolved form while unset
    bare_name: ClassVar[bool] = False  # whether the section may be written as its plugin's name alone

    _entry: Any = PrivateAttr(default=None)
    _params: Any = PrivateAttr(default=None)

    @classmethod
    def groups(cls) -> tuple[str, ...]:
        return (cls.group, *cls.also_groups)

    @classmethod
    def written(cls, raw: Any) -> Any:
        """`raw` as a mapping when it is a name alone and the section takes that (`bare_name`)."""
        return {cls.name_key: raw} if cls.bare_name and isinstance(raw, str) else raw

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, raw: Any) -> Any:
        return cls.written(raw)

    @property
    def plugin_name(self) -> str:
        return getattr(self, self.name_key)

    def plugin_keys(self) -> dict:
        """The keys of this section that are the plugin's (as written)."""
        return dict(self.model_extra or {})

    def resolve(self, entry: Any, params: BaseModel) -> None:
        """Attach the registry's entry and the plugin's validated parameters."""
        self._entry, self._params = entry, params

    @property
    def resolved(self) -> bool:
        return self._params is not None

    @property
    def plugin(self) -> Any:
        """The plugin, every hook of its kind's contract present (`pab_framework.contracts`)."""
        if self._entry is None:
            raise RuntimeError(f"plugin {self.plugin_name!r} used before the spec was resolved")
        return self._entry.plugin

    @property
    def params(self) -> BaseModel:
        if self._params is None:
            raise RuntimeError(f"plugin {self.plugin_name!r} used before the spec was resolved")
        return self._params

    @model_serializer(mode="wrap")
    def _serialize(self, handler):
        data = handler(self)
        if self._params is None:
            return data
        own = {k: data[k] for k in type(self).model_fields if k in data and not (k in self.omit_if_none and data[k] is None)}
        return {**own, **self._params.model_dump(mode="json")}


class PluginCall(PluginSection):
    """A section that names a plugin (`name:`) and passes it parameters."""

    name: str = Field(description="Which plugin; `pab plugins` lists the installed ones.")


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

    def _at_round(self, density: float) -> float:
        """`density` as this stage's round reaches it (the whole of it without rounds)."""
        return density if self.rounds is None else density_at(self.round, self.rounds, density, self.schedule)

    def target_density(self) -> float:
        """The density this stage ends at: `density`, or its round's share of the schedule."""
        return self._at_round(self.density)

    def mask_policy(self) -> MaskPolicy:
        """The masking options of this section (how scores become masks), for `masking.prune`."""
        cd = self.classifier_density
        return MaskPolicy(density=self.target_density(), iterations=self.iterations, schedule=self.schedule, scope=self.scope,
                          classifier_density=None if cd is None else self._at_round(cd), prune_bias=self.prune_bias,
                          prune_batchnorm=self.prune_batchnorm, exclude=tuple(self.exclude))


class OptimizerCall(PluginCall):
    group: ClassVar[str] = "pab.optimizers"


class QuantizerCall(PluginCall):
    group: ClassVar[str] = "pab.quantizers"


class TransformCall(PluginCall):
    """A model transform of a training stage: a `pab.transforms` plugin, or a gradient quantizer
    (`pab.quantizers`, such as psg), which is a transform too."""

    group: ClassVar[str] = "pab.transforms"
    also_groups: ClassVar[tuple[str, ...]] = ("pab.quantizers",)


class LoggerCall(PluginCall):
    """A tracker of `runtime.loggers`: a `pab.loggers` plugin, by its name alone or as
    `{name: ..., <its parameters>}`."""

    group: ClassVar[str] = "pab.loggers"
    bare_name: ClassVar[bool] = True
    every_s: float = Field(
        10.0, ge=0, le=86_400,
        description="Figures go to this tracker at most every this many seconds: the epochs that end meanwhile go together "
        "(fewer, larger requests when epochs are short); 0: each epoch as it ends. A stage's last epochs go before it completes.")
    wait_s: float = Field(
        60.0, gt=0, le=86_400,
        description="How long the run waits for this tracker where it must (to reach it before the first stage; its last figures, "
        "files and status at a stage's end); past that, one warning and the run goes on without waiting for it.")
