"""`bop`: sign flips for the masked weights, a full-precision optimizer (`rest:`) for the others.

Bop (Helwegen et al., 2019) keeps a moving average m of each weight's gradient and flips the
weight's sign where |m| >= tau and sign(m) = sign(w). Magnitudes never change and pruned (zero)
weights stay zero, which is exactly PaB's "train only the signs of the surviving weights".
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from pab_framework.optim import OptimizerContext, TrainOptimizer
from pab_framework.spec import OptimizerCall

from .bop_optim import Bop as BopOptimizer


class Decay(BaseModel):
    model_config = ConfigDict(extra="forbid")
    every: int = Field(..., ge=1, description="Multiply by `factor` every this many epochs.")
    factor: float = Field(..., gt=0, le=1, description="Decay factor.")


class BopHybrid(TrainOptimizer):
    """Bop for the sign-trained weights and another optimizer for the rest, as one optimizer."""

    def __init__(self, bop: BopOptimizer, rest: TrainOptimizer, names: list[str], params: "BopPlugin.Params", mask_state=None):
        self.bop = bop
        self.rest = rest
        self.names = names
        self.p = params
        self.sign_params = frozenset(names)
        self.mask_state = mask_state  # the live masks: surviving counts follow them
        self.ar = params.ar
        self.tau = params.tau
        # the signs the training starts from (the upstream model's: built before any resume), kept
        # on the host as one bool per weight, for the "sign differs from initialisation" figure
        weights = [q for g in bop.param_groups for q in g["params"]]
        self.init_negative = [w.detach().lt(0).cpu() for w in weights]
        self.surviving = [int(w.detach().ne(0).sum()) for w in weights]

    def zero_grad(self) -> None:
        # Bop's gradients live in one flat buffer: one zeroing op, and autograd accumulates into it
        self.bop.zero_grad(set_to_none=False)
        self.rest.zero_grad()

    def step(self) -> None:
        self.bop.step()
        self.rest.step()

    def step_end(self) -> None:
        self.rest.step_end()

    def _surviving(self) -> list[int]:
        if self.mask_state is None:
            return self.surviving
        kept = self.mask_state.kept()
        return [kept.get(n, s) for n, s in zip(self.names, self.surviving)]

    def record(self, sink) -> None:
        """Flips of the epoch (total, per surviving weight, per layer into flips.jsonl), the share of
        surviving weights whose sign differs from the start, ar and tau; then the rest's figures.
        One host transfer per epoch; the flip counters start again from zero."""
        counts = self.bop.flip_counts()
        flips = torch.stack(counts).tolist() if counts else []  # one host sync per epoch
        self.bop.reset_flip_counts()
        weights = [q for g in self.bop.param_groups for q in g["params"]]
        changed = [int((w.detach().lt(0).cpu() != neg).sum()) for w, neg in zip(weights, self.init_negative)]
        surviving = self._surviving()
        total_kept = max(1, sum(surviving))
        sink.scalars({"flips": sum(flips), "flip_rate": sum(flips) / total_kept, "sign_changed": sum(changed) / total_kept,
                      "ar": self.ar, "tau": self.tau}, show=("flips",))
        sink.layers({n: {"flips": f, "flip_rate": f / max(1, k), "sign_changed": c / max(1, k), "surviving": k}
                     for n, f, c, k in zip(self.names, flips, changed, surviving)}, table="flips")
        self.rest.record(sink)

    def schedule_epoch(self, epoch: int) -> None:
        self.rest.schedule_epoch(epoch)
        done = epoch + 1
        if self.p.ar_decay and done % self.p.ar_decay.every == 0:
            self.ar *= self.p.ar_decay.factor
            self.bop.set_ar(self.ar)
        if self.p.tau_decay and done % self.p.tau_decay.every == 0:
            self.tau *= self.p.tau_decay.factor
            self.bop.set_tau(self.tau)

    def state_dict(self) -> dict:
        return {"bop": self.bop.state_dict(), "rest": self.rest.state_dict(), "ar": self.ar, "tau": self.tau}

    def load_state_dict(self, state: dict) -> None:
        self.bop.load_state_dict(state["bop"])
        self.rest.load_state_dict(state["rest"])
        self.ar, self.tau = state["ar"], state["tau"]


class BopPlugin:
    """Bop for the masked (prunable) weights; `rest:` optimizes BatchNorm, biases and anything else."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        ar: float = Field(1e-3, gt=0, lt=1, description="Adaptivity rate of the gradient moving average, in (0, 1).")
        tau: float = Field(1e-6, ge=0, description="Flip threshold on |m|.")
        init_average: Literal["zero", "first_grad"] = Field(
            "zero", description="`zero`: m starts at 0 (Bop paper); `first_grad`: the first step sets m = g*(1+ar), as the original PaB code."
        )
        ar_decay: Optional[Decay] = Field(None, description="Multiply ar by `factor` every `every` epochs.")
        tau_decay: Optional[Decay] = Field(None, description="Multiply tau by `factor` every `every` epochs.")
        implementation: Literal["auto", "eager", "compiled"] = Field(
            "auto", json_schema_extra={"key": False},
            description="`eager`: plain torch ops over one flat vector; `compiled`: one torch.compile'd kernel per step "
            "(compiled once per process, a few seconds, then close to memory speed); `auto`: compiled for 1M+ sign-trained weights. "
            "Both compute bitwise alike, so the choice does not change a stage's key."
        )
        owns: Literal["masked", "conv"] = Field(
            "masked", description="Which weights Bop trains: every masked weight, or Conv2d weights only (as the original PaB code)."
        )
        rest: OptimizerCall = Field(default_factory=lambda: OptimizerCall(name="sgd"), description="Optimizer for the parameters Bop does not own.")

    def build(self, params: "BopPlugin.Params", octx: OptimizerContext) -> TrainOptimizer:
        def owned(name: str) -> bool:
            if name not in octx.masks:
                return False
            return params.owns == "masked" or isinstance(octx.module_of.get(name), nn.Conv2d)

        names = [n for n, _ in octx.named_params if owned(n)]
        bop = BopOptimizer([p for n, p in octx.named_params if owned(n)], ar=params.ar, tau=params.tau, init_average=params.init_average,
                           implementation=params.implementation)
        rest_names = {n for n, _ in octx.named_params if not owned(n)}
        rest = params.rest.plugin.build(params.rest.params, octx.subset(rest_names))
        return BopHybrid(bop, rest, names, params, octx.mask_state)
