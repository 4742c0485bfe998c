"""`train`: train the upstream model; with Bop, only the signs of the surviving weights change."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from pab_framework.masks import MaskState
from pab_framework.modelutil import prunable_parameters
from pab_framework.spec import OptimizerCall, QuantizerCall, TransformCall
from pab_framework.trainer import Trainer
from pab_framework.transforms import TransformContext, apply_all


class TrainStage:
    """Train for `epochs` with the named optimizer (and model transforms); metrics.jsonl gets one line per epoch.

    Checkpoints every epoch (and every `checkpoint_every_steps` steps); a re-run resumes exactly
    where the last checkpoint left off. SIGTERM/SIGINT write a checkpoint at the next step boundary
    and stop with exit code 3."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        epochs: int = Field(..., ge=1, le=100_000, description="Training epochs.")
        optimizer: OptimizerCall = Field(default_factory=lambda: OptimizerCall(name="sgd"), description="Optimizer plugin and its parameters.")
        quantizer: Optional[QuantizerCall] = Field(None, description="A gradient quantizer such as PSG: the first model transform.")
        transforms: list[TransformCall] = Field(
            default_factory=list, description="Model transforms applied in order after `quantizer` (pab.transforms or pab.quantizers plugins).")
        label_smoothing: float = Field(0.0, ge=0, lt=1)
        checkpoint_every_steps: Optional[int] = Field(
            None, ge=1, le=10**9, json_schema_extra={"key": False},
            description="Also checkpoint every this many steps within an epoch (always at every epoch end); a resume is exact, "
            "so this does not change the result.",
        )
        on_nonfinite: Literal["stop", "skip"] = Field(
            "stop", description="A non-finite loss: `stop` the stage with an error (the last good checkpoint is kept) or `skip` the step."
        )

    def key(self, view) -> dict:
        """The result depends on the whole model and data sections (batch sizes included), the
        seed, this stage's parameters, and the numerics of `runtime` (AMP, a per-rank batch)."""
        return view.default(runtime=True)

    def run(self, ctx) -> dict:
        p = ctx.params
        model, masks = ctx.load_model()
        model.to(ctx.device)
        state = MaskState.dense_or(model, masks, list(prunable_parameters(model)))
        tctx = TransformContext(state, ctx.device, ctx.seed)
        model = apply_all(model, ([p.quantizer] if p.quantizer is not None else []) + list(p.transforms), tctx)
        trainer = Trainer(ctx, model, state, p.optimizer, epochs=p.epochs, callbacks=tctx.callbacks, label_smoothing=p.label_smoothing,
                          checkpoint_every_steps=p.checkpoint_every_steps, on_nonfinite=p.on_nonfinite)
        result = trainer.fit()
        ctx.save_model(model, state.as_dict())
        return result
