"""The live masks of a training run.

A training stage owns one `MaskState`: a bool tensor per masked parameter, on the device. The
Trainer re-masks with it after every step, checkpoints carry it, and `model.pt` and
`result.json`'s `density` are written from it when training ends. Optimizers (through
`OptimizerContext.mask_state`), transforms (`TransformContext.masks`) and callbacks
(`trainer.masks`) read it, and may change the sparsity pattern during training with
`replace()`: pruning during training, regrowth, a supermask learned over frozen weights.

How a mask is enforced depends on the weight:
- a trainable weight (`requires_grad`) is kept at zero where its mask is False: `replace()` zeroes
  the newly pruned entries at once, and the Trainer multiplies the weights by their masks after
  every optimizer step, except for those the optimizer keeps at zero itself (its `sign_params`,
  as Bop: a sign flip of zero is zero);
- a frozen weight is never changed: a transform that freezes weights applies their masks in its
  own forward (edge-popup), so the initial values of pruned weights stay available.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import torch
import torch.nn as nn


class MaskState:
    """Bool masks by parameter name, kept on the parameters' device, replaceable during training."""

    def __init__(self, masks: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]):
        for n, m in masks.items():
            if n not in params:
                raise ValueError(f"mask {n!r} names no parameter of the model")
            if tuple(m.shape) != tuple(params[n].shape):
                raise ValueError(f"mask {n!r} has shape {tuple(m.shape)}, its parameter {tuple(params[n].shape)}")
        self._params = {n: params[n] for n in masks}
        self._masks = {n: m.detach().to(device=params[n].device, dtype=torch.bool) for n, m in masks.items()}
        self.version = 0
        self._cache: dict = {}

    @classmethod
    def dense_or(cls, model: nn.Module, masks: Mapping[str, torch.Tensor] | None, names: list[str]) -> "MaskState":
        """`masks`, or (when there are none: a dense start) all-True masks for the parameters `names`."""
        params = dict(model.named_parameters())
        if not masks:
            masks = {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}
        return cls(masks, params)

    # ------------------------------------------------------------------ reading
    def __contains__(self, name: object) -> bool:
        return name in self._masks

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def names(self) -> list[str]:
        return list(self._masks)

    def items(self):
        return self._masks.items()

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The current masks (the tensors themselves: do not modify them in place; use `replace`)."""
        return dict(self._masks)

    def kept(self) -> dict[str, int]:
        """Surviving weights per masked parameter (read once per change of the masks)."""
        if self._cache.get("kept_version") != self.version:
            counts = torch.stack([m.count_nonzero() for m in self._masks.values()]).tolist() if self._masks else []
            self._cache["kept"] = dict(zip(self._masks, counts))
            self._cache["kept_version"] = self.version
        return dict(self._cache["kept"])

    def density(self) -> tuple[int, int]:
        """(kept, total) over every masked parameter."""
        kept = sum(self.kept().values())
        return kept, sum(m.numel() for m in self._masks.values())

    # ------------------------------------------------------------------ changing
    def replace(self, updates: Mapping[str, torch.Tensor]) -> None:
        """Replace the masks of some parameters (bool tensors of the parameters' shapes).

        Newly pruned entries of trainable weights are zeroed now; the Trainer re-masks with the new
        masks from the next step on; checkpoints, `model.pt` and `result.json` use the latest
        masks. A parameter without a mask cannot be given one here (the masked set is fixed when
        training starts)."""
        new = {}
        for n, m in updates.items():
            if n not in self._masks:
                raise KeyError(f"{n!r} has no mask (masked parameters: {', '.join(list(self._masks)[:5])}...)")
            if tuple(m.shape) != tuple(self._masks[n].shape):
                raise ValueError(f"the new mask of {n!r} has shape {tuple(m.shape)}, not {tuple(self._masks[n].shape)}")
            new[n] = m.detach().to(device=self._masks[n].device, dtype=torch.bool)
        trainable = [n for n in new if self._params[n].requires_grad]
        if trainable:
            with torch.no_grad():
                torch._foreach_mul_([self._params[n] for n in trainable], [new[n].to(self._params[n].dtype) for n in trainable])
        self._masks.update(new)
        self.version += 1

    def load(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Take every mask from `masks` (a checkpoint's): the same names and shapes as now."""
        if set(masks) != set(self._masks) or any(tuple(masks[k].shape) != tuple(self._masks[k].shape) for k in masks):
            raise ValueError("its masks do not match the model")
        self._masks = {k: masks[k].detach().to(device=self._masks[k].device, dtype=torch.bool) for k in self._masks}
        self.version += 1

    # ------------------------------------------------------------------ the Trainer's
    def remask_(self, exclude: frozenset[str] = frozenset()) -> None:
        """Zero the pruned entries of the trainable masked weights not in `exclude` (one
        multi-tensor multiply; the 0/1 multipliers are rebuilt only when the masks change)."""
        key = (self.version, exclude)
        if self._cache.get("remask_key") != key:
            names = [n for n in self._masks if n not in exclude and self._params[n].requires_grad]
            self._cache["remask"] = ([self._params[n] for n in names], [self._masks[n].to(self._params[n].dtype) for n in names])
            self._cache["remask_key"] = key
        ps, ms = self._cache["remask"]
        if ps:
            with torch.no_grad():
                torch._foreach_mul_(ps, ms)
