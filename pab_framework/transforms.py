"""Model transforms: what a training stage applies to the model before it trains, in order.

A transform plugin (entry-point group `pab.transforms`, or `pab.quantizers` for the gradient
quantizers such as PSG: the same interface) has `Params` and

    apply(model, params, tctx) -> nn.Module

which changes the model (swaps or wraps Conv2d/Linear, adds parameters, freezes weights) in
place or returns a new one. `tctx` is a `TransformContext`: the live masks, the device, and
`add_callback(cb)` to take part in the training loop (record figures each epoch, change the
masks, keep state across a resume). Transforms compose: a stage's `quantizer:` first, then its
`transforms:` list in order, each applied to what the previous one returned.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from .masks import MaskState

if TYPE_CHECKING:  # pragma: no cover
    from .callbacks import Callback


@dataclass
class TransformContext:
    """What a transform gets besides the model and its parameters.

    `masks`: the run's live MaskState (`masks.names()`: the masked, i.e. prunable, parameters).
    `device`: where the model is. `seed`: the experiment's seed (for a transform's own random
    draws: use a generator seeded from it so every rank and every resume draws alike).
    `add_callback(cb)`: a `pab_framework.callbacks.Callback` the Trainer runs with the others.
    """

    masks: MaskState
    device: torch.device
    seed: int = 0
    callbacks: list["Callback"] = field(default_factory=list)

    @classmethod
    def of(cls, model: nn.Module, names, seed: int = 0) -> "TransformContext":
        """A context for applying transforms outside a training stage (a notebook, a benchmark, a
        test): dense masks on the parameters `names` of `model`."""
        params = dict(model.named_parameters())
        masks = {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}
        dev = next(iter(params.values())).device if params else torch.device("cpu")
        return cls(MaskState(masks, params), dev, seed)

    @property
    def masked_names(self) -> set[str]:
        return set(self.masks.names())

    def add_callback(self, cb: "Callback") -> None:
        self.callbacks.append(cb)


def apply_all(model: nn.Module, calls: list, tctx: TransformContext) -> nn.Module:
    """Apply transform calls (resolved spec sections) in order; each gets what the previous returned."""
    for call in calls:
        out = call.plugin.apply(model, call.params, tctx)
        model = out if out is not None else model
    return model
