"""`train`: train the upstream model; with Bop, only the signs of the surviving weights change."""
from __future__ import annotations

from functools import partial
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pab_framework.callbacks import KeepWeights
from pab_framework.masks import MaskState
from pab_framework.modelutil import prunable_parameters
from pab_framework.specification import OptimizerCall, QuantizerCall, TransformCall
from pab_framework.trainer import Trainer
from pab_framework.transforms import TransformContext, apply_all


class TrainStage:
    """Train for `epochs` with the named optimizer (and model transforms); metrics.jsonl gets one line per epoch.

    Checkpoints at every epoch's end but the last (model.pt follows it at once) and every
    `checkpoint_every_steps` steps; a re-run resumes exactly
    where the last checkpoint left off. SIGTERM/SIGINT/SIGUSR2 write a checkpoint at the next step boundary
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
            description="Also checkpoint every this many steps within an epoch (always at the end of every epoch but the last); a resume is exact, "
            "so this does not change the result.",
        )
        keep_weights: list[int] = Field(
            default_factory=list, description="Also keep the model after these epochs (0: before training) as model-epoch<k>.pt: "
            "rewinding points for later stages (`weights_from: {stage: <this>, epoch: k}`).")
        on_nonfinite: Literal["stop", "skip"] = Field(
            "stop", description="A non-finite loss: `stop` the stage with an error (the last good checkpoint is kept) or `skip` the step."
        )

        @field_validator("keep_weights")
        @classmethod
        def _epochs(cls, v: list[int], info):
            epochs = info.data.get("epochs")
            bad = [k for k in v if k < 0 or (epochs is not None and k > epochs)]
            if bad:
                raise ValueError(f"epochs to keep must be from 0 to epochs ({epochs}); got {bad}")
            return sorted(set(v))

    def data_splits(self, params) -> tuple[str, ...]:
        """What must exist before the stage starts (pab_framework.datacheck)."""
        return ("train", "val")

    def kept_epochs(self, params) -> list[int]:
        """The epochs whose weights later stages may start from (`keep_weights`)."""
        return list(params.keep_weights)

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
        callbacks = [KeepWeights(p.keep_weights)] if p.keep_weights else []
        build_optimizer = partial(p.optimizer.plugin.build, p.optimizer.params)  # (octx) -> the TrainOptimizer
        trainer = Trainer(ctx, model, state, build_optimizer, epochs=p.epochs, callbacks=[*callbacks, *tctx.callbacks],
                          label_smoothing=p.label_smoothing, checkpoint_every_steps=p.checkpoint_every_steps, on_nonfinite=p.on_nonfinite)
        result = trainer.fit()
        ctx.save_model(model, state.as_dict())
        return result
