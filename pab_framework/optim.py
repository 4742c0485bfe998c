"""The interface between the train stage and optimizer plugins.

An optimizer plugin's `build(params, octx)` returns a `TrainOptimizer`: one object with
`zero_grad()`, `step()`, `epoch_end()` (schedules; returns figures for metrics.jsonl) and a state
dict, however many torch optimizers it holds inside (Bop for the masked weights and SGD for the
rest, say).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn


@dataclass
class OptimizerContext:
    named_params: list[tuple[str, nn.Parameter]]
    masks: dict[str, torch.Tensor]
    epochs: int
    steps_per_epoch: int
    module_of: dict[str, nn.Module] = field(default_factory=dict)  # parameter name -> owning module

    def subset(self, names: set[str]) -> "OptimizerContext":
        return OptimizerContext([(n, p) for n, p in self.named_params if n in names], {n: m for n, m in self.masks.items() if n in names}, self.epochs, self.steps_per_epoch, self.module_of)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.named_params]


class TrainOptimizer:
    """Base: subclasses set `sign_params` to the names whose zeros they keep themselves."""

    sign_params: frozenset[str] = frozenset()

    def zero_grad(self) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def step_end(self) -> None:
        """After every step (per-step schedules)."""

    def epoch_end(self, epoch: int) -> dict[str, Any]:
        """After epoch `epoch` (0-based): advance per-epoch schedules; figures for metrics.jsonl."""
        return {}

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


class TorchOptimizer(TrainOptimizer):
    """A torch optimizer and an optional LR scheduler stepped per epoch or per step."""

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

    def epoch_end(self, epoch: int) -> dict[str, Any]:
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None and not self.per_step:
            self.scheduler.step()
        return {self.label: lr}

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
