"""`train`: train the upstream model; with Bop, only the signs of the surviving weights change."""
from __future__ import annotations

import math
import time
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from pab_framework import artifacts, loggers
from pab_framework.errors import TrainingError
from pab_framework.modelutil import density_of, prunable_parameters
from pab_framework.optim import OptimizerContext
from pab_framework.spec import OptimizerCall, QuantizerCall


@torch.no_grad()
def evaluate(model: nn.Module, batches) -> dict:
    """Validation loss and accuracy (fractions), with one host sync at the end."""
    was_training = model.training
    model.eval()
    loss_sum = None
    correct = None
    n = 0
    for x, y in batches:
        out = model(x)
        l = F.cross_entropy(out, y, reduction="sum")
        c = (out.argmax(1) == y).sum()
        loss_sum = l if loss_sum is None else loss_sum + l
        correct = c if correct is None else correct + c
        n += y.numel()
    model.train(was_training)
    if n == 0:
        return {"val_loss": float("nan"), "val_acc": 0.0, "val_n": 0}
    return {"val_loss": float(loss_sum) / n, "val_acc": float(correct) / n, "val_n": n}


class TrainStage:
    """Train for `epochs` with the named optimizer (and quantizer); metrics.jsonl gets one line per epoch."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        epochs: int = Field(..., ge=1, le=100_000, description="Training epochs.")
        optimizer: OptimizerCall = Field(default_factory=lambda: OptimizerCall(name="sgd"), description="Optimizer plugin and its parameters.")
        quantizer: Optional[QuantizerCall] = Field(None, description="A model transform such as PSG low-precision gradients.")
        label_smoothing: float = Field(0.0, ge=0, lt=1)

    def run(self, ctx) -> dict:
        p = ctx.params
        model, masks = ctx.load_model()
        prunable = prunable_parameters(model)
        if not masks:  # dense start: every prunable weight is kept
            masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in prunable.items()}
        model.to(ctx.device)
        if p.quantizer is not None:
            model = p.quantizer.plugin.apply(model, p.quantizer.params, set(masks))
        train = ctx.batches("train")
        val = ctx.batches("val")
        module_of = {f"{mn}.{pn}" if mn else pn: m for mn, m in model.named_modules() for pn, _ in m.named_parameters(recurse=False)}
        named = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
        octx = OptimizerContext(named, masks, p.epochs, len(train), module_of)
        opt = p.optimizer.plugin.build(p.optimizer.params, octx)
        # weights the optimizer does not keep at zero itself are re-masked after every step
        params_by_name = dict(named)
        remask = [n for n in masks if n not in opt.sign_params and n in params_by_name]
        remask_p = [params_by_name[n] for n in remask]
        remask_m = [masks[n].to(ctx.device, params_by_name[n].dtype) for n in remask]
        metrics: list[dict] = []
        loss_fn = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
        t_start = time.perf_counter()
        with ctx.reporter.task("epoch", total=p.epochs) as ep_task, ctx.reporter.task("batch", total=len(train)) as b_task:
            for epoch in range(p.epochs):
                model.train()
                train.set_epoch(epoch)
                b_task.reset(f"epoch {epoch + 1}", len(train))
                loss_sum = torch.zeros((), device=ctx.device)
                correct = torch.zeros((), device=ctx.device, dtype=torch.long)
                seen = 0
                t0 = time.perf_counter()
                for x, y in train:
                    opt.zero_grad()
                    out = model(x)
                    loss = loss_fn(out, y)
                    loss.backward()
                    opt.step()
                    if remask_p:
                        with torch.no_grad():
                            torch._foreach_mul_(remask_p, remask_m)
                    opt.step_end()
                    loss_sum += loss.detach() * y.numel()
                    correct += (out.detach().argmax(1) == y).sum()
                    seen += y.numel()
                    b_task.advance(1)
                train_loss = float(loss_sum) / max(1, seen)
                if not math.isfinite(train_loss):
                    raise TrainingError(f"stage {ctx.stage_id}: training loss is not finite in epoch {epoch + 1} ({train_loss})")
                opt_figs = opt.epoch_end(epoch)
                row = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": float(correct) / max(1, seen)}
                row.update(evaluate(model, val))
                row.update({k: v for k, v in opt_figs.items() if not isinstance(v, dict)})
                row["epoch_s"] = round(time.perf_counter() - t0, 3)
                metrics.append(row)
                if ctx.dist.is_main:
                    artifacts.write_jsonl(ctx.dir / artifacts.METRICS, metrics)
                    loggers.log_epoch(ctx, row)  # runtime.loggers: tensorboard, csv
                    per_layer = {k: v for k, v in opt_figs.items() if isinstance(v, dict)}
                    if per_layer:
                        artifacts.write_jsonl(ctx.dir / "layers.jsonl", [*artifacts.read_jsonl(ctx.dir / "layers.jsonl")[:epoch], {"epoch": epoch + 1, **per_layer}])
                extra = f"  flips {row['flips']}" if "flips" in row else ""
                ep_task.advance(1, info=f"loss {train_loss:.4f}  val_acc {row['val_acc']:.4f}{extra}", log=True)
        kept, total = density_of(masks)
        ctx.save_model(model, masks)
        last = metrics[-1]
        return {
            "density": kept / total if total else 1.0,
            "val_acc": last["val_acc"],
            "val_loss": last["val_loss"],
            "train_loss": last["train_loss"],
            "best_val_acc": max(m["val_acc"] for m in metrics),
            "epochs": p.epochs,
            "train_s": round(time.perf_counter() - t_start, 3),
        }
