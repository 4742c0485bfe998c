"""The Trainer: the training loop every stage kind that trains shares.

A train stage is a short recipe (`plugins/stages/train.py`): load the upstream model and masks,
apply the transforms, `Trainer(...).fit()`, save. The loop itself only does what every step
needs: forward (under `runtime.amp`), loss, backward (through the fp16 gradient scaler), the
optimizer step, re-masking with the live masks, the running sums; at every epoch's end it
evaluates, lets the optimizer, the transforms and the callbacks record their figures into one
metrics sink, then advances the schedules. Everything else is a callback
(`pab_framework.callbacks`): checkpoints and resume, the non-finite policy, stop signals,
metrics files and loggers, progress, test hooks, the DDP agreement check.

The loop never waits for the device inside a step: the running sums stay on the device, the
non-finite flag is read every few steps on accelerators, figures are read once per epoch.
"""
from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint
from .callbacks import HOOKS, Callback, standard
from .errors import ArtifactError
from .masks import MaskState
from .metrics import MetricsSink, finite_figures
from .optim import OptimizerContext, TrainOptimizer

# the columns of metrics.jsonl the Trainer writes itself; plugins record under other names
TRAINER_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_n", "epoch_s")


@torch.no_grad()
def evaluate(model: nn.Module, batches, dist=None) -> dict:
    """Validation loss and accuracy (fractions), with one host sync at the end. Under DDP (`dist`
    enabled, `batches` sharded) the sums are all-reduced, so every rank reports the whole split."""
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
    if dist is not None and dist.enabled:
        dev = next(iter(model.parameters())).device
        sums = torch.stack([torch.zeros((), dtype=torch.float64, device=dev) if loss_sum is None else loss_sum.double(),
                            torch.zeros((), dtype=torch.float64, device=dev) if correct is None else correct.double(),
                            torch.tensor(float(n), dtype=torch.float64, device=dev)])
        dist.sum_(sums)
        loss_sum, correct, n = sums[0], sums[1], int(sums[2])
    if n == 0:
        return {"val_loss": float("nan"), "val_acc": 0.0, "val_n": 0}
    return {"val_loss": float(loss_sum) / n, "val_acc": float(correct) / n, "val_n": n}


OptimizerFactory = Callable[[OptimizerContext], TrainOptimizer]


class Trainer:
    """Train `model` for `epochs` on the stage's data with the optimizer `build_optimizer` makes.

    `stage`: the StageContext (data, device, processes, directory, reporter). `masks`: the run's
    live MaskState. `build_optimizer(octx)`: the optimizer, built once the data (steps per epoch)
    and the trainable parameters are known; an `OptimizerCall` (a spec's `optimizer:`) is
    accepted too. `callbacks`: the stage's own, run among `callbacks.standard(...)`'s (pass
    `standard_callbacks=False` to choose every callback yourself).

    After `fit()`: `metrics` (one row per epoch), `masks` (the final masks), `result()`.
    """

    def __init__(self, stage, model: nn.Module, masks: MaskState, build_optimizer: Any, *, epochs: int,
                 callbacks: Sequence[Callback] = (), standard_callbacks: bool = True, label_smoothing: float = 0.0,
                 checkpoint_every_steps: int | None = None, on_nonfinite: str = "stop",
                 loss_fn: nn.Module | None = None):
        self.stage = stage
        self.stage_id = stage.stage_id
        self.dir = stage.dir
        self.device = stage.device
        self.dist = stage.dist
        self.reporter = stage.reporter
        self.model = model
        self.masks = masks
        self.epochs = epochs
        self.train = stage.batches("train", shard=True)
        self.val = stage.batches("val", shard=True)
        self.steps_per_epoch = len(self.train)
        self.net = stage.parallel(model)  # DDP under several processes: gradients all-reduced, so Bop flips alike everywhere
        named = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
        module_of = {f"{mn}.{pn}" if mn else pn: m for mn, m in model.named_modules() for pn, _ in m.named_parameters(recurse=False)}
        trainable = dict(named)
        octx = OptimizerContext(named, {n: m for n, m in masks.items() if n in trainable}, epochs, self.steps_per_epoch, module_of, masks)
        if hasattr(build_optimizer, "plugin") and hasattr(build_optimizer, "params"):  # a spec's OptimizerCall
            call = build_optimizer
            build_optimizer = lambda o: call.plugin.build(call.params, o)  # noqa: E731
        self.opt: TrainOptimizer = build_optimizer(octx)
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.scaler = stage.grad_scaler()
        self._scaled = _ScaledStep(self.opt, [q for _, q in named], self.scaler) if self.scaler is not None else None
        self.callbacks: list[Callback] = (standard(callbacks, checkpoint_every_steps=checkpoint_every_steps, on_nonfinite=on_nonfinite)
                                          if standard_callbacks else list(callbacks))
        # where training stands
        self.epoch = 0  # the epoch in progress (0-based); after it ends, the number of epochs done
        self.step = 0  # steps of it done
        self.metrics: list[dict] = []
        self.saves = 0
        self.last_saved = None
        self._writer = checkpoint.Writer()  # checkpoints are written in the background, one at a time
        self.stop_requested: str | None = None
        self._saved_at = None  # (epoch, step) of the last checkpoint written in this session
        self.elapsed_before = 0.0
        self.t_start = time.perf_counter()
        self._zero()

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train until `epochs` are done (from where a checkpoint left off); returns result figures."""
        hooks = {h: [getattr(cb, h) for cb in self.callbacks if _overrides(cb, h)] for h in HOOKS}
        on_step_end, before_forward, on_loss = hooks["on_step_end"], hooks["before_forward"], hooks["on_loss"]
        fit_end: dict = {}
        with ExitStack() as stack:
            stack.callback(self._finish_writes_quietly)  # (the error that ends the stage comes first)
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
                        self.interrupt(self.stop_requested)
                for f in hooks["on_train_epoch_end"]:
                    f(self)
                self.dist.broadcast_buffers_(self.model)  # rank 0's BatchNorm statistics everywhere, for validation and the checkpoint
                loss_sum, correct, seen = self.totals()
                row = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen), "train_acc": correct / max(1, seen)}
                row.update(evaluate(self.model, self.val, self.dist))
                sink = MetricsSink(reserved=TRAINER_COLUMNS)
                self.opt.record(sink)
                for f in hooks["record"]:
                    f(self, sink)
                self.opt.schedule_epoch(epoch)
                figures = sink.collect()
                row.update(figures.scalars)
                row["epoch_s"] = round(time.perf_counter() - t0, 3)
                # a validation loss that overflowed is a missing figure (JSON has no NaN), not a crash
                self.metrics.append(finite_figures(row))
                self._next_epoch()
                for f in hooks["on_epoch_end"]:
                    f(self, figures)
                if self.stop_requested:
                    self.interrupt(self.stop_requested, save=self._saved_at != (self.epoch, self.step))
            self._writer.wait()  # the last checkpoint on disk (or its write error raised) before the stage ends
            for f in hooks["on_fit_end"]:
                fit_end.update(f(self) or {})
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
            self.loss_sum.add_(loss.detach(), alpha=y.numel())  # (one op: a multiply-add)
            self.correct += (out.detach().argmax(1) == y).sum()
            self.seen += y.numel()
        self.step += 1

    def result(self) -> dict:
        """result.json figures: the final density (of the live masks) and the last epoch's."""
        kept, total = self.masks.density()
        last = self.metrics[-1]
        return {
            "density": kept / total if total else 1.0,
            "val_acc": last["val_acc"],
            "val_loss": last["val_loss"],
            "train_loss": last["train_loss"],
            "best_val_acc": max(m["val_acc"] for m in self.metrics),
            "epochs": self.epochs,
        }

    # ------------------------------------------------------------------ running sums
    def _zero(self) -> None:
        dev = self.device
        self.loss_sum = torch.zeros((), device=dev)
        self.correct = torch.zeros((), device=dev, dtype=torch.long)
        self.seen = 0

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.step = 0
        self._zero()

    def _sums(self) -> torch.Tensor:
        """(loss sum, correct, seen) of the epoch so far over every rank (a collective under DDP)."""
        t = torch.stack([self.loss_sum.double(), self.correct.double(),
                         torch.tensor(float(self.seen), dtype=torch.float64, device=self.loss_sum.device)])
        return self.dist.sum_(t)

    def totals(self) -> tuple[float, int, int]:
        loss_sum, correct, seen = self._sums().tolist()
        return loss_sum, int(correct), int(seen)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    # ------------------------------------------------------------------ checkpoints
    def _payload(self, sums: torch.Tensor) -> dict:
        return {
            "stage": self.stage_id,
            "epoch": self.epoch,
            "step": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "model": dict(self.model.state_dict()),
            "masks": self.masks.as_dict(),  # (bool already; the snapshot makes the host copy)
            "optimizer": self.opt.state_dict(),
            "rng": checkpoint.rng_state(),
            "metrics": list(self.metrics),
            # summed over ranks: rank 0 carries them on after a resume, the others start from zero
            "running": {"loss_sum": sums[0].to("cpu", torch.float32), "correct": sums[1].to("cpu", torch.long), "seen": int(sums[2])},
            "callbacks": {type(cb).__name__: st for cb in self.callbacks if (st := cb.state_dict()) is not None},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "elapsed": self.elapsed(),
        }

    def save_checkpoint(self) -> None:
        """Every rank calls this at the same points; rank 0 writes. Callbacks' `before_save` run first."""
        for cb in self.callbacks:
            if _overrides(cb, "before_save"):
                cb.before_save(self)
        sums = self._sums()
        self._saved_at = (self.epoch, self.step)
        if not self.dist.is_main:
            return
        self.saves += 1
        # a host copy now (tens of milliseconds); serialising and writing go on beside training
        payload = checkpoint.snapshot(self._payload(sums))
        self.last_saved = self._writer.submit(self.dir, self.stage.key, payload, count=self.saves)

    def _finish_writes_quietly(self) -> None:
        """On the way out after an error: let the write in flight finish; its own failure is logged."""
        try:
            self._writer.wait()
        except Exception as e:  # the error already on its way out is the one to report
            self.reporter.log(f"[yellow]warning[/]: {getattr(e, 'message', None) or e}")

    def interrupt(self, signame: str, save: bool = True) -> None:
        if save:
            self.save_checkpoint()
        self._writer.wait()  # "checkpoint written" must be true when it is said
        where = f"epoch {self.epoch + 1}, step {self.step}" if self.step else f"the end of epoch {self.epoch}"
        raise checkpoint.Interrupted(  # printed after "stopped: "
            f"{signame} at {where}; checkpoint written to {self.last_saved or self.dir}. "
            f"Run the same command again to resume (exit code {checkpoint.EXIT_INTERRUPTED})."
        )

    def resume(self) -> None:
        """Load the newest good checkpoint of this stage, if any, and carry on from it."""
        got = checkpoint.load(self.dir, self.stage.key, warn=lambda m: self.reporter.log(f"[yellow]warning[/]: {m}"))
        if got is None:
            return
        ck, path = got
        try:
            if ck.get("steps_per_epoch") != self.steps_per_epoch:
                raise ArtifactError(f"it was written with {ck.get('steps_per_epoch')} steps per epoch, this run has {self.steps_per_epoch}")
            self.model.load_state_dict(ck["model"])
            try:
                self.masks.load(ck["masks"])
            except ValueError as e:
                raise ArtifactError(str(e)) from None
            self.opt.load_state_dict(ck["optimizer"])
            checkpoint.set_rng_state(ck["rng"])
            self.epoch, self.step = int(ck["epoch"]), int(ck["step"])
            self.metrics = list(ck["metrics"])
            r = ck["running"]
            if self.dist.is_main:  # the sums were over every rank: one rank carries them on
                self.loss_sum = r["loss_sum"].to(self.device)
                self.correct = r["correct"].to(self.device)
                self.seen = int(r["seen"])
            states = ck.get("callbacks") or {}
            for cb in self.callbacks:
                if type(cb).__name__ in states:
                    cb.load_state_dict(states[type(cb).__name__])
            if self.scaler is not None and ck.get("scaler"):
                self.scaler.load_state_dict(ck["scaler"])
            self.elapsed_before = float(ck["elapsed"])
        except ArtifactError as e:
            raise ArtifactError(f"{path}: cannot resume from this checkpoint: {e.message}. Run with --restart to start afresh.") from None
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ArtifactError(f"{path}: cannot resume from this checkpoint ({type(e).__name__}: {msg[:200]}). Run with --restart to start afresh.") from None
        self.last_saved = path
        self.stage.earlier_s = self.elapsed_before  # result.json: compute_s counts the interrupted sessions too
        at = f"epoch {self.epoch + 1}, step {self.step}/{self.steps_per_epoch}" if self.epoch < self.epochs else "the end of training"
        kind = getattr(getattr(self.stage, "stage", None), "kind", None)
        # the only line about the resume (the pipeline leaves it to the stage, which knows where)
        self.reporter.log(f"[bold]resuming[/] {self.stage_id}{f' ({kind})' if kind else ''} from {path} at {at} (--restart starts it afresh)")


def _overrides(cb: Callback, hook: str) -> bool:
    return getattr(type(cb), hook) is not getattr(Callback, hook)


class _ScaledStep:
    """fp16: the optimizer steps through torch's GradScaler (gradients unscaled first; a step with
    non-finite gradients is skipped and the scale lowered). GradScaler drives torch optimizers by
    their `param_groups` and `step()`; `_View` gives it ours."""

    class _View:
        def __init__(self, opt, params: list):
            self.opt = opt
            self.param_groups = [{"params": params}]

        def step(self):
            self.opt.step()

    def __init__(self, opt, params: list, scaler):
        self.scaler = scaler
        self.view = self._View(opt, params)

    def step(self) -> None:
        self.scaler.step(self.view)
        self.scaler.update()
