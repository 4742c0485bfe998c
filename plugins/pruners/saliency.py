"""Data-dependent pruning at initialisation: SNIP and GraSP.

Both score over the pruning batches (the prune stage draws them from a seeded subset of the
training set: `batches` x `batch_size`), and normalise the scores as the original PaB code does.
The framework keeps the highest scores (pab_framework.masking).
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field


def _batches(inputs):
    if not inputs.batches:
        raise ValueError("this pruner needs data: the prune stage gives it pruning batches")
    for x, y in inputs.batches:
        yield x.to(inputs.device, inputs.dtype), y.to(inputs.device)


def _add_grads_(total: list[torch.Tensor], grads, weights) -> None:
    """total += grads, a weight the loss does not reach (grad None) adding zero."""
    torch._foreach_add_(total, [g if g is not None else torch.zeros_like(w) for g, w in zip(grads, weights)])


def _summed_grads(model, weights, inputs, temperature: float = 1.0) -> list[torch.Tensor]:
    """The loss gradients (logits / temperature) summed over the pruning batches, no graph kept."""
    total = [torch.zeros_like(w) for w in weights]
    for x, y in _batches(inputs):
        _add_grads_(total, torch.autograd.grad(inputs.loss_fn(model(x) / temperature, y), weights, allow_unused=True), weights)
    return total


class SNIP:
    """SNIP (Lee et al., 2019): connection sensitivity |dL/dm| = |g * theta| for a mask m = 1 on each
    weight, gradients summed over the pruning batches, normalised by the total."""

    needs_data = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def score(self, params, model, prunable, inputs) -> dict[str, torch.Tensor]:
        names = list(prunable)
        weights = [prunable[n] for n in names]
        grads = _summed_grads(model, weights, inputs)
        scores = [(g * w.detach()).abs_() for g, w in zip(grads, weights)]
        total = sum(s.sum() for s in scores)
        return {n: s.div_(total) for n, s in zip(names, scores)}


class GraSP:
    """GraSP (Wang et al., 2020): score = (H g) * theta, with g the gradient of the loss on logits
    divided by `temperature`, summed over the pruning batches, and H g by double back-propagation;
    normalised by |sum| + eps. Keeping the highest (H g) * theta is removing the highest of GraSP's
    S = -theta * H g, as in the paper and the original code.

    Memory: one batch's graph at a time. First pass: g = sum of the batches' gradients (no graph
    kept); second pass: per batch, the gradient with its graph, dotted with g (detached) and
    back-propagated at once, so that graph is freed before the next batch."""

    needs_data = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        temperature: float = Field(200.0, gt=0, description="Logits are divided by this before the loss.")
        eps: float = Field(1e-10, gt=0, description="Added to |sum of scores| before normalising.")

    def score(self, params, model, prunable, inputs) -> dict[str, torch.Tensor]:
        names = list(prunable)
        weights = [prunable[n] for n in names]
        g_stop = _summed_grads(model, weights, inputs, params.temperature)
        hg = [torch.zeros_like(w) for w in weights]
        for x, y in _batches(inputs):
            g = torch.autograd.grad(inputs.loss_fn(model(x) / params.temperature, y), weights, create_graph=True, allow_unused=True)
            dot = sum((gi * gs).sum() for gi, gs in zip(g, g_stop) if gi is not None)
            if not dot.requires_grad:  # a model that is linear in its weights has H = 0
                continue
            _add_grads_(hg, torch.autograd.grad(dot, weights, allow_unused=True), weights)
        scores = [h * w.detach() for h, w in zip(hg, weights)]
        norm = sum(s.sum() for s in scores).abs() + params.eps
        return {n: s.div_(norm) for n, s in zip(names, scores)}
