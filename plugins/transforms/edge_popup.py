"""`edge_popup`: find a subnetwork hidden in frozen random weights (Ramanujan et al., CVPR 2020).

Every masked Conv2d/Linear weight gets a score (Kaiming-uniform initialised, as the paper's code
does); the weights themselves stay frozen at their initialisation. The forward pass uses the
weights whose score ranks among the top `density` of their layer (the layer keeps
n - int((1 - density) n) of its n weights, as the paper's code and pab's pruning count), and the
scores get the straight-through gradient dL/d(w*m) * w, consistently with the ranking:

- `ranking: abs` (default, as the released code): the top |s|; the gradient is
  dL/d(w*m) * w * sign(s) (the code ranks `scores.abs()` through autograd), so a useful weight's
  |s| grows whatever the sign of s;
- `ranking: signed` (as the paper's text): the top s; the gradient is dL/d(w*m) * w.

(The straight-through gradient without sign(s) beside the |s| ranking would shrink |s| of
useful weights with negative scores and drop them: it does not train.)
The scores are ordinary parameters: the stage's optimizer trains them (the paper: SGD, lr 0.1,
momentum 0.9, weight decay 5e-4, cosine).

The run's live masks follow the top-k masks at every epoch's end (checkpoints, density). When
training ends the layers return to plain Conv2d/Linear without scores, so model.pt holds the
untouched initial weights and the final top-k masks, and loads into the model the spec builds:
evaluation, `pab report` and any later stage (Bop on the subnetwork, say) use it as they would a
pruned model.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from pab_framework.callbacks import Callback
from pab_framework.masking import kept_count


class _TopK(torch.autograd.Function):
    """0/1 mask of the `k` largest scores (largest |scores| with `abs_rank`); the gradient passes
    straight through (times sign(s) with `abs_rank`)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: int, abs_grad: bool):
        flat = scores.detach().reshape(-1)
        if abs_grad:
            flat = flat.abs()
        mask = torch.zeros_like(flat)
        mask[torch.topk(flat, k, sorted=False).indices] = 1
        if abs_grad:
            ctx.save_for_backward(scores)
        ctx.abs_grad = abs_grad
        return mask.reshape(scores.shape)

    @staticmethod
    def backward(ctx, g):
        if ctx.abs_grad:
            (scores,) = ctx.saved_tensors
            g = g * scores.sign()
        return g, None, None


def supermask(m: nn.Module) -> torch.Tensor:
    """The layer's current 0/1 mask (eagerly cached between forwards while the scores do not change
    and no gradient is needed; a compiled forward computes it, as the cache's version checks would
    make the compiler guard on them)."""
    if (torch.is_grad_enabled() and m.scores.requires_grad) or torch.compiler.is_compiling():
        return _TopK.apply(m.scores, m.ep_keep, m.ep_abs)
    version = m.scores._version
    cached = m.__dict__.get("_ep_cache")
    if cached is None or cached[0] != version or cached[1].device != m.scores.device:
        cached = (version, _TopK.apply(m.scores.detach(), m.ep_keep, m.ep_abs))
        m.__dict__["_ep_cache"] = cached
    return cached[1]


class EdgePopupConv2d(nn.Conv2d):
    """An nn.Conv2d with frozen weights and a trained score per weight; made by `EdgePopup.apply`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * supermask(self), self.bias)


class EdgePopupLinear(nn.Linear):
    """An nn.Linear with frozen weights and a trained score per weight; made by `EdgePopup.apply`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * supermask(self), self.bias)


PLAIN = {EdgePopupConv2d: nn.Conv2d, EdgePopupLinear: nn.Linear}


class _Supermasks(Callback):
    """Keeps the run's masks equal to the top-k masks; records how many changed; restores plain layers at the end."""

    def __init__(self, layers: dict[str, nn.Module], masks):
        self.layers, self.masks = layers, masks
        self.previous: dict[str, torch.Tensor] | None = None

    def current(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {n: supermask(m).bool() for n, m in self.layers.items()}

    def record(self, trainer, sink) -> None:
        now = self.current()
        before = self.previous if self.previous is not None else {n: self.masks[n] for n in now}
        changed = sum((now[n] != before[n]).sum() for n in now)
        total = sum(v.numel() for v in now.values())
        sink.scalar("supermask_changed", changed.double() / max(1, total))  # a tensor: read with the epoch's figures
        self.previous = now

    def on_epoch_end(self, trainer, figures) -> None:
        self.masks.replace(self.current())

    def on_fit_end(self, trainer) -> dict:
        self.masks.replace(self.current())
        for m in self.layers.values():  # back to the plain architecture: model.pt loads into the spec's model
            del m.scores
            m.__dict__.pop("_ep_cache", None)
            for attr in ("ep_keep", "ep_abs"):
                delattr(m, attr)
            m.__class__ = PLAIN[type(m)]
            m.weight.requires_grad_(True)
            if m.bias is not None:
                m.bias.requires_grad_(True)
        return {}


class EdgePopup:
    """Edge-popup: train a score per frozen weight and keep the top `density` of each layer by |score|."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        density: float = Field(..., gt=0, le=1, description="Fraction of each layer's weights kept, in (0, 1].")
        ranking: Literal["abs", "signed"] = Field(
            "abs", description="`abs`: keep the top |score|, gradient dL/d(w*m) * w * sign(s) (the released code); `signed`: keep "
            "the top score, gradient dL/d(w*m) * w (the paper's text).")
        freeze_bias: bool = Field(True, description="Freeze the wrapped layers' biases too (only the scores, and any BatchNorm, train).")

    def apply(self, model: nn.Module, params: "EdgePopup.Params", tctx) -> nn.Module:
        layers: dict[str, nn.Module] = {}
        modules = dict(model.named_modules())
        g = torch.Generator(device="cpu").manual_seed(int(tctx.seed) + 5003)  # the same scores on every rank and run
        for wname in tctx.masks.names():
            mname = wname[: -len(".weight")] if wname.endswith(".weight") else None
            m = modules.get(mname) if mname is not None else None
            if type(m) not in (nn.Conv2d, nn.Linear):
                continue
            w = m.weight
            scores = torch.empty(w.shape, dtype=w.dtype)
            bound = _kaiming_uniform_bound(scores, a=math.sqrt(5))
            scores.uniform_(-bound, bound, generator=g)
            m.scores = nn.Parameter(scores.to(w.device))
            m.ep_keep = kept_count(params.density, w.numel())
            m.ep_abs = params.ranking == "abs"
            w.requires_grad_(False)
            if params.freeze_bias and m.bias is not None:
                m.bias.requires_grad_(False)
            m.__class__ = EdgePopupConv2d if type(m) is nn.Conv2d else EdgePopupLinear
            layers[wname] = m
        if not layers:
            raise ValueError("edge_popup: the model has no masked Conv2d or Linear layer to find a subnetwork in")
        tctx.add_callback(_Supermasks(layers, tctx.masks))
        return model


def _kaiming_uniform_bound(t: torch.Tensor, a: float) -> float:
    """The bound of nn.init.kaiming_uniform_(t, a) (fan-in, leaky-ReLU gain with slope a)."""
    fan = nn.init._calculate_correct_fan(t, "fan_in")
    gain = nn.init.calculate_gain("leaky_relu", a)
    return math.sqrt(3.0) * gain / math.sqrt(fan)
