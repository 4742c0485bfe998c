"""Full-precision optimizers: SGD (step or cosine schedule) and Adam (linear decay)."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from pab_framework.optim import NoParams, OptimizerContext, TorchOptimizer, TrainOptimizer


class SGD:
    """SGD with momentum and weight decay; `milestones` step decay (x`gamma`) or a cosine schedule, per epoch."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        lr: float = Field(0.1, gt=0, le=100, description="Learning rate.")
        momentum: float = Field(0.9, ge=0, lt=1)
        weight_decay: float = Field(5e-4, ge=0, le=1)
        nesterov: bool = False
        schedule: Literal["step", "cosine", "constant"] = Field("step", description="Per-epoch LR schedule.")
        milestones: list[int] = Field(default_factory=list, description="Epochs at which a step schedule multiplies lr by gamma.")
        gamma: float = Field(0.1, gt=0, le=1)

    def build(self, params: "SGD.Params", octx: OptimizerContext) -> TrainOptimizer:
        ps = [p for _, p in octx.named_params]
        if not ps:
            return NoParams()
        opt = torch.optim.SGD(ps, lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay,
                              nesterov=params.nesterov and params.momentum > 0)
        if params.schedule == "step":
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=sorted(params.milestones), gamma=params.gamma)
        elif params.schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, octx.epochs))
        else:
            sched = None
        return TorchOptimizer(opt, sched)


class Adam:
    """Adam with an optional linear decay of the learning rate per step to `final_lr` (as the original's Bop+Adam option)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        lr: float = Field(1e-3, gt=0, le=10)
        final_lr: Optional[float] = Field(None, ge=0, description="Learning rate at the last step (linear decay); none keeps lr.")
        betas: tuple[float, float] = (0.9, 0.999)
        weight_decay: float = Field(0.0, ge=0, le=1)

    def build(self, params: "Adam.Params", octx: OptimizerContext) -> TrainOptimizer:
        ps = [p for _, p in octx.named_params]
        if not ps:
            return NoParams()
        opt = torch.optim.Adam(ps, lr=params.lr, betas=params.betas, weight_decay=params.weight_decay)
        if params.final_lr is None:
            return TorchOptimizer(opt)
        total = max(1, octx.epochs * octx.steps_per_epoch)
        end = params.final_lr / params.lr
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - min(step, total) / total * (1.0 - end))
        return TorchOptimizer(opt, sched, per_step=True)
