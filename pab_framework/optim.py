"""The interface between the Trainer and optimizer plugins.

An optimizer plugin's `build(params, octx)` returns a `TrainOptimizer`: one object with
`zero_grad()`, `step()`, per-step and per-epoch schedules, figures recorded into the metrics sink
and a state dict, however many torch optimizers it holds inside (Bop for the masked weights and
SGD for the rest, say). The Trainer takes an `OptimizerFactory`: a function from the
`OptimizerContext` to the `TrainOptimizer` (a train stage makes one from its spec's `optimizer:`,
`functools.partial(call.plugin.build, call.params)`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn

if TYPE_CHECKING:  # pragma: no cover
    from .masks import MaskState
    from .metrics import MetricsSink


@dataclass
class OptimizerContext:
    """What an optimizer plugin is built from.

    `named_params`: the trainable parameters it gets (name, parameter), in model order.
    `masks`: the masks of those of them that are masked, as training starts (bool tensors).
    `mask_state`: the run's live `MaskState` (every masked parameter): read it during training,
    or change the sparsity pattern with `mask_state.replace(...)`.
    `epochs`, `steps_per_epoch`: the length of training, for schedules.
    `module_of`: parameter name -> the module that holds it.
    """

    named_params: list[tuple[str, nn.Parameter]]
    masks: dict[str, torch.Tensor]
    epochs: int
    steps_per_epoch: int
    module_of: dict[str, nn.Module] = field(default_factory=dict)
    mask_state: "MaskState | None" = None

    @classmethod
    def for_model(cls, model: nn.Module, mask_state: "MaskState", epochs: int, steps_per_epoch: int) -> "OptimizerContext":
        """The context of a training run: every trainable parameter of `model`, and the masks of
        those of them that `mask_state` masks."""
        named = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
        module_of = {f"{mn}.{pn}" if mn else pn: m for mn, m in model.named_modules() for pn, _ in m.named_parameters(recurse=False)}
        trainable = dict(named)
        masks = {n: m for n, m in mask_state.items() if n in trainable}
        return cls(named, masks, epochs, steps_per_epoch, module_of, mask_state)

    def subset(self, names: set[str]) -> "OptimizerContext":
        return OptimizerContext([(n, p) for n, p in self.named_params if n in names], {n: m for n, m in self.masks.items() if n in names},
                                self.epochs, self.steps_per_epoch, self.module_of, self.mask_state)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.named_params]


class TrainOptimizer:
    """What the Trainer drives. Subclasses set `sign_params` to the names of the masked weights
    whose zeros they keep themselves (the Trainer re-masks every other masked weight after each step).

    Per epoch, in this order: `record(sink)` (figures of the epoch that ended), then
    `schedule_epoch(epoch)` (advance per-epoch schedules)."""

    sign_params: frozenset[str] = frozenset()

    def zero_grad(self) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def step_end(self) -> None:
        """After every step (per-step schedules)."""

    def record(self, sink: "MetricsSink") -> None:
        """Record the figures of the epoch that just ended (learning rate, flips, ...) into `sink`."""

    def schedule_epoch(self, epoch: int) -> None:
        """After epoch `epoch` (0-based) and its figures: advance per-epoch schedules."""

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


class TorchOptimizer(TrainOptimizer):
    """A torch optimizer and an optional LR scheduler stepped per epoch or per step; records the
    learning rate of the epoch under `label`."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any = None, per_step: bool = False, label: str = "lr"):
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.per_step = per_step
        self.label = label

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.optimizer.step()

    def step_end(self) -> None:
        if self.scheduler is not None and self.per_step:
            self.scheduler.step()

    def record(self, sink: "MetricsSink") -> None:
        sink.scalar(self.label, self.optimizer.param_groups[0]["lr"])

    def schedule_epoch(self, epoch: int) -> None:
        if self.scheduler is not None and not self.per_step:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict() if self.scheduler else None}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])


class NoParams(TrainOptimizer):
    """Stands in when a group of parameters is empty (a model with no BatchNorm or biases)."""

    def zero_grad(self) -> None:
        pass

    def step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


OptimizerFactory = Callable[[OptimizerContext], TrainOptimizer]


class ScaledStep:
    """fp16: the optimizer steps through torch's GradScaler (gradients unscaled first; a step with
    non-finite gradients is skipped and the scale lowered). GradScaler drives torch optimizers by
    their `param_groups` and `step()`; `_View` gives it ours."""

    class _View:
        def __init__(self, opt: TrainOptimizer, params: list):
            self.opt = opt
            self.param_groups = [{"params": params}]

        def step(self):
            self.opt.step()

    def __init__(self, opt: TrainOptimizer, params: list, scaler):
        self.scaler = scaler
        self.view = self._View(opt, params)

    def step(self) -> None:
        self.scaler.step(self.view)
        self.scaler.update()
