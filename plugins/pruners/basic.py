"""Pruning at initialisation: SynFlow, magnitude and random scores.

A pruner only scores the prunable weights; the framework (pab_framework.masking) turns scores into
masks with the density schedule, the scope and exact tie-breaking.
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field


class SynFlow:
    """Iterative Synaptic Flow (Tanaka et al., 2020): score = |theta * dR/dtheta| where
    R = sum(f_|theta|(1)), the network's output on an all-ones input with every parameter and
    buffer replaced by its absolute value (the linearised network). Data-independent.

    `linearized = True` asks the framework's prune loop for that network: it takes the absolute
    values once for all iterations, so `score` gets a model that is already linearised."""

    needs_data = False
    linearized = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def score(self, params, model, prunable, inputs) -> dict[str, torch.Tensor]:
        names = list(prunable)
        weights = [prunable[n] for n in names]
        x = torch.ones((1, *inputs.input_shape), dtype=inputs.dtype, device=inputs.device)
        r = model(x).sum()
        grads = torch.autograd.grad(r, weights, allow_unused=True)
        out = inputs.scores_out or {}
        scores = {}
        with torch.no_grad():
            for n, w, g in zip(names, weights, grads):
                if g is None:
                    scores[n] = torch.zeros_like(w)
                elif n in out:  # straight into the framework's flat score vector
                    scores[n] = torch.mul(g, w, out=out[n]).abs_()
                else:
                    scores[n] = (g * w).abs_()
        return scores


class Magnitude:
    """Magnitude at initialisation: score = |theta|."""

    needs_data = False

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def score(self, params, model, prunable, inputs) -> dict[str, torch.Tensor]:
        return {n: p.detach().abs() for n, p in prunable.items()}


class Random:
    """Random scores (standard normal), seeded by `seed` so masks are reproducible."""

    needs_data = False

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        seed: int | None = Field(None, ge=0, description="Seed of the scores (default: the experiment seed).")

    def score(self, params, model, prunable, inputs) -> dict[str, torch.Tensor]:
        g = torch.Generator(device="cpu")
        g.manual_seed(params.seed if params.seed is not None else getattr(inputs, "seed", 0))
        return {n: torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.device) for n, p in prunable.items()}
