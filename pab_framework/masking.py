"""Masks from scores: the framework's half of every pruner.

A pruner plugin only scores weights (`score()`); this module turns scores into masks with a
density schedule over iterations, global or per-layer thresholds, and exact tie-breaking, so that
every pruner shares one tested implementation of the part that is easy to get subtly wrong.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from .modelutil import prunable_parameters


@dataclass
class PruneInputs:
    """What a pruner may use besides the model: data batches (loaded only for pruners that ask)."""

    input_shape: tuple[int, ...]
    num_classes: int
    loss_fn: Callable = field(default_factory=lambda: nn.CrossEntropyLoss())
    batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float64
    seed: int = 0


def density_at(k: int, iterations: int, density: float, schedule: str) -> float:
    """Target density after round k of `iterations` (k = 1..iterations)."""
    frac = k / iterations
    if schedule == "exponential":
        return density ** frac
    return 1.0 - (1.0 - density) * frac


def keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Bool mask keeping exactly `n_keep` of the highest scores (flattened).

    Ties at the threshold are broken by position (lower index kept first), so the count is exact
    and the result is the same on every run and device.
    """
    n = scores.numel()
    if n_keep >= n:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    if n_keep <= 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    flat = torch.nan_to_num(scores.reshape(-1), nan=float("-inf"))
    # the n_keep-th largest value is the threshold
    thr = torch.kthvalue(flat.cpu() if flat.device.type == "mps" else flat, n - n_keep + 1).values
    keep = flat > thr
    deficit = n_keep - int(keep.sum())
    if deficit > 0:
        ties = torch.nonzero(flat == thr, as_tuple=False).reshape(-1)[:deficit]
        keep[ties] = True
    return keep


def select_masks(scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], density: float, scope: str) -> dict[str, torch.Tensor]:
    """New masks keeping `density` of the weights by score; pruned weights stay pruned."""
    names = list(scores)
    masked = {n: torch.where(masks[n], scores[n].to(torch.float64), torch.tensor(float("-inf"), dtype=torch.float64, device=scores[n].device)) for n in names}
    if scope == "global":
        flat = torch.cat([masked[n].reshape(-1) for n in names])
        total = flat.numel()
        keep = keep_top(flat, round(density * total))
        out, i = {}, 0
        for n in names:
            k = masked[n].numel()
            out[n] = keep[i : i + k].reshape(masked[n].shape)
            i += k
        return out
    return {n: keep_top(masked[n], round(density * masked[n].numel())).reshape(masked[n].shape) for n in names}


def prune(
    model: nn.Module,
    pruner: Any,
    pruner_params: Any,
    call: Any,
    inputs: PruneInputs,
    masks: dict[str, torch.Tensor] | None = None,
    on_round: Callable[[int, float], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Score and mask `iterations` times; returns bool masks by parameter name.

    Scoring runs on a float64 copy of the model (as the original code, to avoid overflow in
    SynFlow), in eval mode, with the current masks applied to its weights. `model` is untouched.
    """
    work = copy.deepcopy(model).to(device=inputs.device, dtype=inputs.dtype)
    work.eval()
    params = prunable_parameters(work)
    original = {n: p.detach().clone() for n, p in params.items()}
    if masks is None:
        masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    else:
        masks = {n: m.to(inputs.device) for n, m in masks.items()}
    for k in range(1, call.iterations + 1):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(original[n] * masks[n])
        scores = pruner.score(pruner_params, work, params, inputs)
        missing = set(params) - set(scores)
        if missing:
            raise RuntimeError(f"pruner {call.name!r} returned no score for {sorted(missing)[:3]}")
        d = density_at(k, call.iterations, call.density, call.schedule)
        masks = select_masks({n: scores[n].detach() for n in params}, masks, d, call.scope)
        if on_round:
            on_round(k, d)
    return {n: m.cpu() for n, m in masks.items()}
