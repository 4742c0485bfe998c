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

from .errors import PabError
from .modelutil import classifier_name, prunable_parameters


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


def kept_count(density: float, n: int) -> int:
    """How many of n weights a density keeps: n minus the int((1 - density) n) pruned, as the
    original code counts (so masks agree with it), hence exact to within one weight."""
    return n - int((1.0 - density) * n)


def _kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of flat (1 <= k <= numel), exactly.

    A full `kthvalue` over millions of scores is the slow part of pruning; instead, the sorted
    values of a fixed random sample bracket the answer, two comparison passes count what lies
    above the bracket, and `kthvalue` runs on the few values inside it. Falls back to the full
    `kthvalue` when the bracket misses (never wrong, only slower)."""
    n = flat.numel()
    if n <= 1 << 16:
        return torch.kthvalue(flat, n - k + 1).values
    m = 1 << 14
    g = torch.Generator(device="cpu").manual_seed(n)
    sample = flat[torch.randint(0, n, (m,), generator=g).to(flat.device)].sort().values
    q = (n - k) / n  # fraction below the threshold
    slack = 6.0 / m**0.5
    lo = sample[max(0, int((q - slack) * m))]
    hi = sample[min(m - 1, int((q + slack) * m) + 1)]
    if bool(torch.isinf(lo)) and lo < 0:
        # pruned weights score -inf; the threshold lies among the survivors (density only falls),
        # so the bracket starts at the smallest finite value sampled
        finite = sample[sample > float("-inf")]
        lo = finite[0] if finite.numel() else lo
    above_hi = int(torch.count_nonzero(flat > hi))
    in_band = (flat >= lo) & (flat <= hi)
    band_n = int(torch.count_nonzero(in_band))
    need = k - above_hi  # the need-th largest inside [lo, hi]
    if 1 <= need <= band_n:
        band = flat[in_band]
        return torch.kthvalue(band, band_n - need + 1).values
    return torch.kthvalue(flat, n - k + 1).values


def keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Bool mask keeping exactly `n_keep` of the highest scores (flattened; NaN counts as lowest).

    Ties at the threshold are broken by position (lower index kept first), so the count is exact
    and the result is the same on every run and device.
    """
    n = scores.numel()
    if n_keep >= n:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    if n_keep <= 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    flat = scores.reshape(-1)
    if bool(torch.isnan(flat).any()):
        flat = torch.nan_to_num(flat, nan=float("-inf"))
    thr = _kth_largest(flat.cpu() if flat.device.type == "mps" else flat, n_keep).to(flat.device)
    keep = flat > thr
    deficit = n_keep - int(torch.count_nonzero(keep))
    if deficit > 0:
        ties = torch.nonzero(flat == thr, as_tuple=False).reshape(-1)[:deficit]
        keep[ties] = True
    return keep


def select_masks(scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], density: float, scope: str) -> dict[str, torch.Tensor]:
    """New masks keeping `density` of the weights by score; pruned weights stay pruned.

    `global`: one threshold over all the given layers, `local`: each layer keeps its share. Pruned
    weights score -inf, so they are the first to go and never come back while density falls."""
    names = list(scores)
    if not names:
        return {}
    if scope == "local":
        return {n: keep_top(scores[n].masked_fill(~masks[n], float("-inf")), kept_count(density, masks[n].numel())).reshape(masks[n].shape) for n in names}
    flat = torch.cat([scores[n].reshape(-1).to(torch.float64) for n in names])
    flat.masked_fill_(~torch.cat([masks[n].reshape(-1) for n in names]), float("-inf"))
    keep = keep_top(flat, kept_count(density, flat.numel()))
    out, i = {}, 0
    for n in names:
        k = masks[n].numel()
        out[n] = keep[i : i + k].reshape(masks[n].shape)
        i += k
    return out


def prune(
    model: nn.Module,
    pruner: Any,
    pruner_params: Any,
    call: Any,
    inputs: PruneInputs,
    masks: dict[str, torch.Tensor] | None = None,
    on_round: Callable[[int, float], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Score and mask `call.iterations` times; returns bool masks by parameter name.

    Scoring runs on a float64 copy of the model (as the original code, to avoid overflow in
    SynFlow), in eval mode unless `call.train_mode`, with the current masks applied to its
    weights; `model` is untouched. The prunable parameters are the Conv2d/Linear weights, plus
    biases and BatchNorm weights when `call.prune_bias` / `call.prune_batchnorm`. With
    `call.classifier_density`, the classifier layer follows its own density schedule and the
    others share the rest.
    """
    work = copy.deepcopy(model).to(device=inputs.device, dtype=inputs.dtype)
    work.train(bool(getattr(call, "train_mode", False)))
    params = prunable_parameters(work, bias=getattr(call, "prune_bias", False), batchnorm=getattr(call, "prune_batchnorm", False))
    original = {n: p.detach().clone() for n, p in params.items()}
    if masks is None:
        masks = {}
    masks = {n: (masks[n].to(inputs.device) if n in masks else torch.ones_like(p, dtype=torch.bool)) for n, p in params.items()}
    cls_density = getattr(call, "classifier_density", None)
    cls = classifier_name(work, inputs.num_classes) if cls_density is not None else None
    if cls_density is not None and cls not in params:
        raise PabError(f"classifier_density: the model has no prunable Linear layer with {inputs.num_classes} outputs to treat as the classifier")
    if getattr(pruner, "linearized", False):
        # SynFlow scores the network with every parameter and buffer replaced by its absolute
        # value: done once here (the original did it, and undid it, every iteration)
        with torch.no_grad():
            for t in {id(t): t for t in work.state_dict(keep_vars=True).values() if t.is_floating_point()}.values():
                t.abs_()
        original = {n: p.detach().clone() for n, p in params.items()}
    for k in range(1, call.iterations + 1):
        with torch.no_grad():
            for n, p in params.items():  # the current masks on the original weights
                p.copy_(original[n]).masked_fill_(~masks[n], 0)
        scores = pruner.score(pruner_params, work, params, inputs)
        missing = set(params) - set(scores)
        if missing:
            raise PabError(f"pruner {call.name!r} returned no score for {sorted(missing)[:3]}")
        scores = {n: scores[n].detach() for n in params}
        d = density_at(k, call.iterations, call.density, call.schedule)
        if cls is None:
            masks = select_masks(scores, masks, d, call.scope)
        else:
            rest = [n for n in params if n != cls]
            dc = density_at(k, call.iterations, cls_density, call.schedule)
            new = select_masks({n: scores[n] for n in rest}, masks, d, call.scope)
            new.update(select_masks({cls: scores[cls]}, masks, dc, "local"))
            masks = {n: new[n] for n in params}
        if on_round:
            on_round(k, d)
    return {n: m.cpu() for n, m in masks.items()}
