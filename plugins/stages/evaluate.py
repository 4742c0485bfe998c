"""`evaluate`: validation loss and accuracy of the upstream model."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from pab_framework.modelutil import density_of
from pab_framework.evaluation import evaluate


class EvaluateStage:
    """Evaluate the upstream model (or the freshly initialised one) on the validation split."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def data_splits(self, params) -> tuple[str, ...]:
        return ("val",)

    def key(self, view) -> dict:
        """The model, the data without the training batch size, the seed and the upstream stages."""
        return view.default(train_batch=False)

    def run(self, ctx) -> dict:
        model, masks = ctx.load_model()
        model.to(ctx.device)
        figs = evaluate(model, ctx.batches("val", shard=True), ctx.dist)  # under DDP each rank a shard, sums reduced
        kept, total = density_of(masks) if masks else (1, 1)
        ctx.log(f"val_acc {figs['val_acc']:.4f}  val_loss {figs['val_loss']:.4f}")
        return {"density": kept / total, **figs}
