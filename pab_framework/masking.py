"""Masks from scores: the framework's half of every pruner.

A pruner plugin only scores weights (`score()`); this module turns scores into masks with a
density schedule over iterations, global or per-layer thresholds, and exact tie-breaking, so that
every pruner shares one tested implementation of the part that is easy to get subtly wrong.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from .contracts import bind
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
    # float64 views, one per prunable weight, that a pruner may write its scores into (and
    # return), sparing the framework a copy; set by `prune`
    scores_out: dict[str, torch.Tensor] | None = None
    train_mode: bool = False  # score with BatchNorm in train mode (eval mode by default, as the original)


@dataclass(frozen=True)
class MaskPolicy:
    """How scores become masks: the kept fraction `density`, reached over `iterations` rounds
    along `schedule`, with one threshold over all layers (`scope: global`) or one per layer
    (`local`); the classifier's own `classifier_density`; which tensors are prunable besides the
    Conv2d/Linear weights (`prune_bias`, `prune_batchnorm`); which stay dense and outside the pool
    (`exclude`: parameter-name patterns, fnmatch style). A spec's pruner section gives one
    (`PrunerCall.mask_policy()`)."""

    density: float
    iterations: int = 1
    schedule: str = "exponential"
    scope: str = "global"
    classifier_density: float | None = None
    prune_bias: bool = False
    prune_batchnorm: bool = False
    exclude: tuple[str, ...] = ()  # parameter-name patterns kept dense and out of the pool


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


def _bracket(flat: torch.Tensor, k: int, valid: torch.Tensor | None = None):
    """Where the k-th largest valid value of `flat` lies, without sorting millions of values.

    The sorted values of a fixed random sample bracket the answer [lo, hi]; two comparison passes
    find what lies above hi and what lies inside the bracket. Returns (above, idx, vals, need):
    the bool mask of valid values above hi, the positions (ascending) and values of the valid
    entries inside the bracket, and which largest value of the bracket the answer is. None when
    `flat` is small or the bracket misses (the caller then falls back to a full `kthvalue`).
    NaN and invalid entries count as the lowest values (-inf)."""
    n = flat.numel()
    if n <= 1 << 16:
        return None
    m = 1 << 16
    g = torch.Generator(device="cpu").manual_seed(n)
    at = torch.randint(0, n, (m,), generator=g).to(flat.device)
    sample = torch.nan_to_num(flat[at], nan=float("-inf"))
    if valid is not None:
        sample.masked_fill_(~valid[at], float("-inf"))
    sample = sample.sort().values
    q = (n - k) / n  # fraction below the answer
    slack = 5.0 / m**0.5
    lo = sample[max(0, int((q - slack) * m))]
    hi = sample[min(m - 1, int((q + slack) * m) + 1)]
    if bool(torch.isinf(lo)) and lo < 0:
        # pruned weights count as -inf; the answer lies among the survivors (density only falls),
        # so the bracket starts at the smallest finite value sampled
        finite = sample[sample > float("-inf")]
        if not finite.numel():
            return None
        lo = finite[0]
    above = flat > hi
    band = flat >= lo
    if valid is not None:
        above &= valid
        band &= valid
    band ^= above  # lo <= value <= hi
    need = k - int(torch.count_nonzero(above))
    idx = torch.nonzero(band, as_tuple=False).reshape(-1)
    if not 1 <= need <= idx.numel():
        return None
    return above, idx, flat[idx], need


def _lowest_invalid(flat: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    flat = torch.nan_to_num(flat, nan=float("-inf"))
    return flat if valid is None else flat.masked_fill_(~valid, float("-inf"))


def _kth_largest(flat: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The k-th largest value of flat (1 <= k <= numel), exactly; entries not `valid` count as -inf."""
    b = _bracket(flat, k, valid)
    if b is None:
        return torch.kthvalue(_lowest_invalid(flat, valid), flat.numel() - k + 1).values
    _, _, vals, need = b
    return torch.kthvalue(vals, vals.numel() - need + 1).values


def keep_top(scores: torch.Tensor, n_keep: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask keeping exactly `n_keep` of the highest scores (flattened; NaN, and entries that
    are not `valid`, count as the lowest: -inf).

    Ties at the threshold are broken by position (lower index kept first), so the count is exact
    and the result is the same on every run and device.
    """
    n = scores.numel()
    if n_keep >= n:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    if n_keep <= 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    flat = scores.reshape(-1)
    valid = None if valid is None else valid.reshape(-1)
    if flat.device.type == "mps":  # no kthvalue there
        return keep_top(flat.cpu(), n_keep, None if valid is None else valid.cpu()).to(flat.device)
    b = _bracket(flat, n_keep, valid)
    if b is None:
        flat = _lowest_invalid(flat, valid)
        thr = torch.kthvalue(flat, n - n_keep + 1).values
        keep = flat > thr
        deficit = n_keep - int(torch.count_nonzero(keep))
        if deficit > 0:
            keep[torch.nonzero(flat == thr, as_tuple=False).reshape(-1)[:deficit]] = True
        return keep
    # everything above the bracket, then the part of the bracket above the threshold, then as
    # many ties (by position) as the count needs: the same result as `flat > thr` plus ties
    keep, idx, vals, need = b
    thr = torch.kthvalue(vals, vals.numel() - need + 1).values
    over = vals > thr
    keep[idx[over]] = True
    deficit = need - int(torch.count_nonzero(over))
    if deficit > 0:
        keep[idx[vals == thr][:deficit]] = True
    return keep


class _Layout:
    """The prunable tensors laid end to end in one flat vector (module order)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.names = list(tensors)
        self.shapes = {n: t.shape for n, t in tensors.items()}
        self.span: dict[str, tuple[int, int]] = {}
        o = 0
        for n, t in tensors.items():
            self.span[n] = (o, o + t.numel())
            o += t.numel()
        self.numel = o

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: flat[a:b].view(self.shapes[n]) for n, (a, b) in self.span.items()}

    def select(self, scores: torch.Tensor, keep: torch.Tensor, group: list[str], density: float) -> torch.Tensor:
        """Keep `density` of the weights of `group` (one threshold over them) by `scores`, among
        those `keep` still keeps; returns the group's new keep mask, its layers end to end."""
        spans = [self.span[n] for n in group]
        if all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1)):
            a, b = spans[0][0], spans[-1][1]
            part, valid = scores[a:b], keep[a:b]
        else:
            part, valid = torch.cat([scores[a:b] for a, b in spans]), torch.cat([keep[a:b] for a, b in spans])
        return keep_top(part, kept_count(density, part.numel()), valid)

    def put(self, keep: torch.Tensor, group: list[str], got: torch.Tensor) -> None:
        i = 0
        for n in group:
            a, b = self.span[n]
            keep[a:b] = got[i : i + b - a]
            i += b - a


@dataclass
class _Pool:
    """Which prunable weights compete for the threshold and which stay outside it."""

    params: dict[str, torch.Tensor]  # scored and pruned: the pool
    order: list[str]  # every prunable weight, in module order
    whole: dict[str, torch.Tensor]  # outside the pool (excluded, or a classifier kept whole): the masks they keep
    classifier: str | None  # in the pool, on its own density schedule (`classifier_density` < 1)


def excluded_names(names: list[str], patterns: tuple[str, ...] | list[str]) -> dict[str, list[str]]:
    """The parameter names each `exclude` pattern matches (fnmatch: `*` spans dots), by pattern."""
    return {pat: [n for n in names if fnmatch.fnmatchcase(n, pat)] for pat in patterns}


def _pool(work: nn.Module, call: MaskPolicy, num_classes: int, masks: dict[str, torch.Tensor] | None) -> _Pool:
    params = prunable_parameters(work, bias=call.prune_bias, batchnorm=call.prune_batchnorm)
    if len({id(p) for p in params.values()}) != len(params):
        raise PabError("the model shares one weight tensor between prunable layers; pruning needs each layer's own weights")
    order = list(params)
    matched = excluded_names(order, call.exclude)
    unmatched = [pat for pat, names in matched.items() if not names]
    if unmatched:
        raise PabError(f"exclude: {', '.join(repr(p) for p in unmatched)} matches no prunable parameter of the model")
    outside = {n for names in matched.values() for n in names}
    cls = classifier_name(work, num_classes) if call.classifier_density is not None else None
    if call.classifier_density is not None and cls not in params:
        raise PabError(f"classifier_density: the model has no prunable Linear layer with {num_classes} outputs to treat as the classifier")
    if cls is not None and (cls in outside or call.classifier_density >= 1.0):
        # a classifier kept whole leaves the pool altogether, like the original CIFAR code's plain
        # nn.Linear (and an excluded layer, like its ImageNet ResNet-50's plain shortcut convolutions):
        # not scored, so it neither competes for a threshold nor enters a pruner's sums over the pool
        # (GraSP's H g, SNIP's normaliser)
        outside.add(cls)
        cls = None
    whole = {}
    for n in (n for n in order if n in outside):  # each keeps the mask it came with
        p = params.pop(n)
        whole[n] = masks[n].to("cpu", torch.bool, copy=True) if masks and n in masks else torch.ones(p.shape, dtype=torch.bool)
        with torch.no_grad():
            p.mul_(whole[n].to(p.device, p.dtype))
    return _Pool(params, order, whole, cls)


def _linearize_(work: nn.Module) -> None:
    """SynFlow scores the network with every parameter and buffer replaced by its absolute value:
    done once here (the original did it, and undid it, every iteration)."""
    with torch.no_grad():
        for t in {id(t): t for t in work.state_dict(keep_vars=True).values() if t.is_floating_point()}.values():
            t.abs_()


def _collect_scores(pruner: Any, got: dict[str, torch.Tensor], scores_out: dict[str, torch.Tensor], names) -> None:
    """A pruner's scores into the framework's flat score vector (a pruner may have written them there itself)."""
    missing = set(names) - set(got)
    if missing:
        raise PabError(f"pruner {bind('pab.pruners', pruner).name} returned no score for {sorted(missing)[:3]}")
    for n, v in scores_out.items():
        s = got[n].detach()
        if s.data_ptr() != v.data_ptr():
            v.copy_(s.reshape(v.shape))


def _select(lay: _Layout, scores: torch.Tensor, keep: torch.Tensor, chosen: list[tuple[list[str], float]]) -> torch.Tensor:
    """The new keep mask: each group keeps its density by score among those `keep` still keeps
    (pruned weights never come back)."""
    if len(chosen) == 1:  # one group, every layer: its mask is the new mask
        return lay.select(scores, keep, *chosen[0])
    new = torch.empty_like(keep)
    for g, dd in chosen:
        lay.put(new, g, lay.select(scores, keep, g, dd))
    return new


def _flatten(params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None, device) -> tuple[_Layout, torch.Tensor, torch.Tensor]:
    """The pool's weights end to end in one vector (the parameters become views of it), and its
    keep mask likewise, from the masks the model came with (all kept where it has none)."""
    lay = _Layout(params)
    weights = torch.cat([p.detach().reshape(-1) for p in params.values()])
    for n, v in lay.views(weights).items():
        params[n].data = v
    keep = torch.ones(lay.numel, dtype=torch.bool, device=device)
    for n, v in lay.views(keep).items():
        if masks and n in masks:
            v.copy_(masks[n])
    return lay, weights, keep


def prune(
    model: nn.Module,
    pruner: Any,
    pruner_params: Any,
    call: MaskPolicy,
    inputs: PruneInputs,
    masks: dict[str, torch.Tensor] | None = None,
    on_round: Callable[[int, float], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Score and mask `call.iterations` times (`call`: the MaskPolicy); returns bool masks by parameter name.

    Scoring runs on a float64 copy of the model (as the original code, to avoid overflow in
    SynFlow), in eval mode unless `inputs.train_mode`, with the current masks applied to its
    weights; `model` is untouched. The prunable parameters are the Conv2d/Linear weights, plus
    biases and BatchNorm weights when `call.prune_bias` / `call.prune_batchnorm`; those matching
    `call.exclude`, and a classifier whose `classifier_density` is 1.0, stay outside the pool:
    neither scored nor pruned, they keep the masks they came with. With `call.classifier_density`
    < 1 the classifier follows its own density schedule and the others share the rest. Pruned
    weights score -inf, so they are the first to go and never come back while density falls;
    `global` scope puts one threshold over all layers, `local` keeps each layer's share.

    The copy's pool weights, the scores and the masks each live in one flat vector (the
    parameters are views of it), so masking the weights, marking the pruned and choosing the
    threshold are a few passes over one vector, not a loop of per-layer copies and concatenations.
    """
    work = copy.deepcopy(model).to(device=inputs.device, dtype=inputs.dtype)
    work.train(inputs.train_mode)
    pool = _pool(work, call, inputs.num_classes, masks)
    params, cls = pool.params, pool.classifier
    if not params:
        if on_round:
            for k in range(1, call.iterations + 1):
                on_round(k, density_at(k, call.iterations, call.density, call.schedule))
        return pool.whole
    if bind("pab.pruners", pruner).linearized:  # a plugin object as a direct caller passes it, or one bound already
        _linearize_(work)
    lay, weights, keep = _flatten(params, masks, inputs.device)
    keep_f = torch.empty_like(weights)  # keep as 0/1 in the weights' dtype: masking is one multiply
    scores = torch.empty(lay.numel, dtype=torch.float64, device=inputs.device)
    inputs = dataclasses.replace(inputs, scores_out=lay.views(scores))
    body = [n for n in lay.names if n != cls]  # the layers that share `density` (all but a separate classifier)
    groups = [[n] for n in body] if call.scope == "local" else [body] if body else []
    for k in range(1, call.iterations + 1):
        with torch.no_grad():
            weights.mul_(keep_f.copy_(keep))  # the current masks on the weights
        got = pruner.score(pruner_params, work, params, inputs)
        with torch.no_grad():
            _collect_scores(pruner, got, inputs.scores_out, params)
            d = density_at(k, call.iterations, call.density, call.schedule)
            cls_d = [([cls], density_at(k, call.iterations, call.classifier_density, call.schedule))] if cls else []
            keep = _select(lay, scores, keep, [(g, d) for g in groups] + cls_d)
        if on_round:
            on_round(k, d)
    got = {n: v.to("cpu", copy=True) for n, v in lay.views(keep).items()}
    return {n: got[n] if n in got else pool.whole[n] for n in pool.order}
