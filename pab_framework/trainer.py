"""The Trainer: the training loop every stage kind that trains shares (`plugins/stages/train.py`:
load the upstream model and masks, apply the transforms, `Trainer(...).fit()`, save).

A step: forward (under `runtime.amp`), loss, backward (through the fp16 gradient scaler), the
optimizer step, re-masking with the live masks, the running sums. An epoch's end: evaluation, the
figures of the optimizer and the callbacks recorded into one metrics sink, the schedules advanced.
The rest is callbacks (`pab_framework.callbacks`), checkpoints and resume the run's `Checkpointer`
(`checkpointing`), runtime.compile `compiling`. Nothing in a step waits for the device."""
from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Sequence

import torch.nn as nn

from . import compiling
from .callbacks import Callback, hook_table, standard
from .checkpointing import Checkpointer
from .evaluation import RunningSums, evaluate
from .masks import MaskState
from .metrics import MetricsSink, finite_figures
from .optim import OptimizerContext, OptimizerFactory, ScaledStep, TrainOptimizer

# the columns of metrics.jsonl the Trainer writes itself; plugins record under other names
TRAINER_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_n", "epoch_s")


class Trainer:
    """Train `model` for `epochs` on the data of `stage` (a StageContext) with the optimizer
    `build_optimizer(octx)` makes once the steps per epoch and trainable parameters are known.
    `masks`: the run's live MaskState. `callbacks`: the stage's own, run among
    `callbacks.standard(...)`'s (`standard_callbacks=False`: choose every callback yourself, the
    run's `checkpoints` included). Callbacks see it as a `callbacks.TrainerView`."""

    def __init__(self, stage, model: nn.Module, masks: MaskState, build_optimizer: OptimizerFactory, *, epochs: int,
                 callbacks: Sequence[Callback] = (), standard_callbacks: bool = True, label_smoothing: float = 0.0,
                 checkpoint_every_steps: int | None = None, on_nonfinite: str = "stop", loss_fn: nn.Module | None = None):
        self.stage, self.device, self.dist = stage, stage.device, stage.dist
        self.model, self.masks, self.epochs = model, masks, epochs
        self.train, self.val = stage.batches("train", shard=True), stage.batches("val", shard=True)
        self.steps_per_epoch = len(self.train)
        compiled = compiling.in_place(stage, model)  # runtime.compile: forward compiled in place, before DDP wraps the model
        self.net = stage.parallel(model)  # DDP under several processes: gradients all-reduced, so every rank steps alike
        octx = OptimizerContext.for_model(model, masks, epochs, self.steps_per_epoch)
        self.opt: TrainOptimizer = build_optimizer(octx)
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.scaler = stage.grad_scaler()
        self._scaled = ScaledStep(self.opt, [q for _, q in octx.named_params], self.scaler) if self.scaler is not None else None
        self.checkpoints = Checkpointer(stage, checkpoint_every_steps)
        self.callbacks: list[Callback] = [*compiled, *(standard(callbacks, checkpoints=self.checkpoints, on_nonfinite=on_nonfinite)
                                                       if standard_callbacks else callbacks)]
        # where training stands
        self.epoch, self.step = 0, 0  # the epoch in progress (0-based; after it ends, the epochs done), steps of it done
        self.sums = RunningSums(self.device)  # of the epoch in progress, on this rank
        self.metrics: list[dict] = []
        self.stop_requested: str | None = None
        self.elapsed_before = 0.0  # seconds of the sessions before a resume
        self.t_start = time.perf_counter()

    @property
    def last_saved(self):  # the newest checkpoint written or resumed from, or None
        return self.checkpoints.last_saved

    def request_stop(self, reason: str) -> None:
        """Stop at the next step boundary (or this epoch's end), writing a checkpoint first."""
        self.stop_requested = self.stop_requested or reason

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def fit(self) -> dict:
        """Train until `epochs` are done (from where a checkpoint left off); returns result figures."""
        hooks = hook_table(self.callbacks)
        on_step_end, before_forward, on_loss = hooks["on_step_end"], hooks["before_forward"], hooks["on_loss"]
        with ExitStack() as stack:
            stack.callback(self.checkpoints.finish_quietly)  # (the error that ends the stage comes first)
            for f in hooks["setup"]:
                f(self, stack)
            for epoch in range(self.epoch, self.epochs):
                self.model.train()
                self.train.set_epoch(epoch, skip=self.step)
                for f in hooks["on_epoch_start"]:
                    f(self)
                t0 = time.perf_counter()
                for x, y in self.train:
                    self._step(x, y, before_forward, on_loss)
                    for f in on_step_end:
                        f(self)
                    if self.stop_requested:
                        self.checkpoints.interrupt(self, self.stop_requested)
                for f in hooks["on_train_epoch_end"]:
                    f(self)
                figures = self._close_epoch(epoch, t0, hooks["record"])
                for f in hooks["on_epoch_end"]:
                    f(self, figures)
                if self.stop_requested:
                    self.checkpoints.interrupt(self, self.stop_requested)
            self.checkpoints.wait()  # the last checkpoint on disk (or its write error raised) before the stage ends
            fit_end = {k: v for f in hooks["on_fit_end"] for k, v in (f(self) or {}).items()}
        return {**fit_end, **self.result()}

    def _step(self, x, y, before_forward, on_loss) -> None:
        opt = self.opt
        opt.zero_grad()
        for f in before_forward:
            f(self)
        with self.stage.autocast():
            out = self.net(x)
            loss = self.loss_fn(out, y)
        take = True
        for f in on_loss:
            take = f(self, loss) and take
        if take:
            if self._scaled is not None:
                self.scaler.scale(loss).backward()
                self._scaled.step()
            else:
                loss.backward()
                opt.step()
            self.masks.remask_(opt.sign_params)
            opt.step_end()
            self.sums.add(loss.detach(), out.detach(), y, weight=y.numel())
        self.step += 1

    def _close_epoch(self, epoch: int, t0: float, record: list):
        """The epoch's row of metrics.jsonl (training sums, evaluation, recorded figures); then the
        next epoch's counters. Returns the figures recorded into the sink."""
        self.dist.broadcast_buffers_(self.model)  # rank 0's BatchNorm statistics everywhere, for validation and the checkpoint
        loss_sum, correct, seen = self.sums.totals(self.dist)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen), "train_acc": correct / max(1, seen)}
        row.update(evaluate(self.model, self.val, self.dist))
        sink = MetricsSink(reserved=TRAINER_COLUMNS)
        self.opt.record(sink)
        for f in record:
            f(self, sink)
        self.opt.schedule_epoch(epoch)
        figures = sink.collect()
        row.update(figures.scalars)
        row["epoch_s"] = round(time.perf_counter() - t0, 3)
        self.metrics.append(finite_figures(row))  # a validation loss that overflowed is a missing figure (JSON has no NaN)
        self.epoch, self.step, self.sums = self.epoch + 1, 0, RunningSums(self.device)
        return figures

    def result(self) -> dict:
        """result.json figures: the final density (of the live masks) and the last epoch's."""
        kept, total = self.masks.density()
        last = self.metrics[-1]
        return {"density": kept / total if total else 1.0, **{k: last[k] for k in ("val_acc", "val_loss", "train_loss")},
                "best_val_acc": max(m["val_acc"] for m in self.metrics), "epochs": self.epochs}
