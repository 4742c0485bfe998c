"""`prune`: score the initialised network and keep `density` of its prunable weights."""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from pab_framework import masking
from pab_framework.modelutil import apply_masks_, density_of
from pab_framework.spec import PrunerCall


class PruneStage:
    """Prune at initialisation; writes model.pt (weights with pruned entries zeroed, and masks)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        pruner: PrunerCall = Field(..., description="Which pruner, and the masking options (density, iterations, schedule, scope).")

    def run(self, ctx) -> dict:
        params = ctx.params
        call = params.pruner
        model, masks = ctx.load_model()
        info = ctx.data_info()
        inputs = masking.PruneInputs(input_shape=tuple(info.input_shape), num_classes=info.num_classes, device=ctx.device, seed=ctx.seed)
        if getattr(call.plugin, "needs_data", True):
            batches = ctx.batches("train", shuffle=False)
            inputs.batches = [next(iter(batches))]
        with ctx.reporter.task(f"prune {call.name}", total=call.iterations) as task:
            def on_round(k: int, d: float) -> None:
                task.advance(1, info=f"density {d:.4f}", log=k == call.iterations or k % max(1, call.iterations // 4) == 0)

            masks = masking.prune(model, call.plugin, call.params, call, inputs, masks or None, on_round)
        params_by_name = dict(model.named_parameters())
        apply_masks_(params_by_name, masks)
        ctx.save_model(model, masks)
        kept, total = density_of(masks)
        layers = {n: [int(m.sum()), m.numel()] for n, m in masks.items()}
        ctx.log(f"pruned to density {kept / total:.4f} ({kept}/{total} prunable weights kept)")
        return {"density": kept / total, "kept": kept, "total": total, "pruner": call.name, "layers": layers}
