"""Callbacks: each concern of a training run besides the loop itself, testable alone.

The Trainer (`pab_framework.trainer`) runs the loop and calls, in this order:

    setup(trainer, stack)            once, before training (resume, signal handlers, progress bars);
                                     context managers entered on `stack` close when training ends
    on_epoch_start(trainer)          before the epoch's first step
    before_forward(trainer)          before each forward pass
    on_loss(trainer, loss) -> bool   after the loss: False skips the step (every callback is asked)
    on_step_end(trainer)             after each step, taken or skipped
    on_train_epoch_end(trainer)      after the epoch's last step, before anything of it is evaluated or written
    record(trainer, sink)            the epoch's figures, into the metrics sink
    on_epoch_end(trainer, figures)   the epoch is complete (figures collected; trainer.epoch already advanced)
    before_save(trainer)             before any checkpoint is written
    on_fit_end(trainer) -> dict      after the last epoch; entries for result.json
    state_dict() / load_state_dict() what a callback keeps across a resume (in the checkpoint)

A hook a callback does not override costs nothing: the Trainer calls only the overridden ones.

What a callback may read and call on the trainer it is given is `TrainerView`, and nothing else:

    model            the model (never the DDP wrapper): read it, change its weights in place
    masks            the run's live MaskState: `masks.replace(...)` changes the sparsity pattern
    opt              the TrainOptimizer
    device, dist     where the run computes; this process's rank, the world and its collectives
    epoch, step      where training stands: epochs done, steps done of the epoch in progress
    steps_per_epoch, epochs
    metrics          the rows of metrics.jsonl so far (one per epoch done; read only)
    stage            the StageContext: `dir`, `stage_id`, `spec`, `reporter`, `log()`
    last_saved       the newest checkpoint written or resumed from (a Path), or None
    stop_requested   why the run is to stop at the next step boundary, or None
    request_stop(why)  stop at the next step boundary, writing a checkpoint first (as SIGTERM does)

The standard callbacks (`standard`) use only these; so may a plugin's.
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from typing import TYPE_CHECKING, Protocol, Sequence

import torch

from . import artifacts, checkpoint
from .distributed import StopVote, state_digest
from .errors import TrainingError
from .metrics import EpochFigures, rewrite_table

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    import torch.nn as nn

    from .context import StageContext
    from .distributed import DistInfo
    from .masks import MaskState
    from .metrics import MetricsSink
    from .optim import TrainOptimizer


class TrainerView(Protocol):
    """The Trainer as a callback sees it (module docstring)."""

    model: "nn.Module"
    masks: "MaskState"
    opt: "TrainOptimizer"
    device: torch.device
    dist: "DistInfo"
    epoch: int
    step: int
    steps_per_epoch: int
    epochs: int
    metrics: list[dict]
    stage: "StageContext"

    @property
    def last_saved(self) -> "Path | None": ...

    @property
    def stop_requested(self) -> str | None: ...

    def request_stop(self, reason: str) -> None: ...


class Callback:
    """Base class: every hook does nothing."""

    def setup(self, trainer: "TrainerView", stack: ExitStack) -> None: ...

    def on_epoch_start(self, trainer: "TrainerView") -> None: ...

    def before_forward(self, trainer: "TrainerView") -> None: ...

    def on_loss(self, trainer: "TrainerView", loss: torch.Tensor) -> bool:
        return True

    def on_step_end(self, trainer: "TrainerView") -> None: ...

    def on_train_epoch_end(self, trainer: "TrainerView") -> None: ...

    def record(self, trainer: "TrainerView", sink: "MetricsSink") -> None: ...

    def on_epoch_end(self, trainer: "TrainerView", figures: EpochFigures) -> None: ...

    def before_save(self, trainer: "TrainerView") -> None: ...

    def on_fit_end(self, trainer: "TrainerView") -> dict:
        return {}

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict) -> None: ...


HOOKS = ("setup", "on_epoch_start", "before_forward", "on_loss", "on_step_end", "on_train_epoch_end", "record", "on_epoch_end",
         "before_save", "on_fit_end")


def hook_table(callbacks: Sequence[Callback]) -> dict[str, list]:
    """For each hook, the bound methods of the callbacks that override it, in the callbacks' order."""
    return {h: [getattr(cb, h) for cb in callbacks if getattr(type(cb), h) is not getattr(Callback, h)] for h in HOOKS}


# --------------------------------------------------------------------------- non-finite losses
# on_nonfinite: stop reads its flag on the host (waiting for the device) every this many steps:
# every step on the CPU, where nothing runs ahead; every few on accelerators, so that steps queue
# up without waiting. The flag is also read before every checkpoint and at every epoch's end.
FINITE_CHECK_EVERY = {"cpu": 1}
FINITE_CHECK_EVERY_ACCELERATOR = 32


class StopOnNonFinite(Callback):
    """`on_nonfinite: stop`. Each step's loss is copied into a slot of a small device buffer (one
    copy per step, no wait); the check reads whether any since the last check is not finite and
    stops the stage naming the first one's epoch and step. A non-finite step may be followed by
    a few more before the check, but nothing is written in between: the last good checkpoint is
    kept."""

    def __init__(self, every: int | None = None):
        self.every = every

    def setup(self, trainer, stack) -> None:
        dev = trainer.device
        if self.every is None:
            self.every = FINITE_CHECK_EVERY.get(dev.type, FINITE_CHECK_EVERY_ACCELERATOR)
        self.every = max(1, self.every)
        self.trainer = trainer
        self.losses = torch.zeros(self.every, dtype=torch.float32, device=dev)  # the steps' losses since the last check
        self.steps: list[tuple[int, int]] = []  # (epoch, step) of those steps

    def on_loss(self, trainer, loss) -> bool:
        self.losses[len(self.steps)].copy_(loss.detach())
        self.steps.append((trainer.epoch, trainer.step))
        if len(self.steps) >= self.every:
            self.check()  # before the step is taken
        return True

    def on_train_epoch_end(self, trainer) -> None:
        self.check()  # a non-finite epoch is neither evaluated nor logged

    def before_save(self, trainer) -> None:
        self.check()

    def check(self) -> None:
        if not self.steps:
            return
        seen = self.losses[: len(self.steps)]
        if not bool(torch.isfinite(seen).all()):  # the one wait for the device
            vals = seen.tolist()
            i = next(k for k, v in enumerate(vals) if not math.isfinite(v))
            epoch, step = self.steps[i]
            kept = self.trainer.last_saved or "none written yet"
            raise TrainingError(
                f"stage {self.trainer.stage.stage_id}: the training loss is not finite ({vals[i]}) at epoch {epoch + 1}, "
                f"step {step + 1}; the last good checkpoint is kept ({kept}). Lower the learning rate, or set on_nonfinite: skip"
            )
        self.steps.clear()


class SkipNonFinite(Callback):
    """`on_nonfinite: skip`: a step whose loss is not finite is not taken, and its forward pass is
    taken out of BatchNorm's running statistics. Under DDP the ranks skip together or not at all.
    The host must know at every step (one synchronisation per step: the price of this policy).
    Records `skipped_steps` (skipped so far in the epoch) every epoch."""

    def setup(self, trainer, stack) -> None:
        self.buffers = [b for b in trainer.model.buffers() if b.is_floating_point() or b.dtype == torch.long]
        self.skipped = 0
        self.saved: list[torch.Tensor] = []

    def before_forward(self, trainer) -> None:
        self.saved = [b.detach().clone() for b in self.buffers]

    def on_loss(self, trainer, loss) -> bool:
        finite = torch.isfinite(loss.detach())
        if trainer.dist.enabled:
            finite = trainer.dist.min_(finite.to(torch.int32)) > 0
        if bool(finite):
            return True
        self.skipped += 1
        if self.buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.buffers, self.saved)
        return False

    def record(self, trainer, sink) -> None:
        sink.scalar("skipped_steps", self.skipped)

    def on_epoch_end(self, trainer, figures) -> None:
        self.skipped = 0

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))


# --------------------------------------------------------------------------- signals
class StopSignals(Callback):
    """SIGTERM/SIGINT/SIGUSR2 (`checkpoint.StopSignals`): every rank agrees on the step boundary to
    stop at and requests the stop there; the Trainer then writes a checkpoint (unless one was just
    written there) and stops with exit code 3."""

    def setup(self, trainer, stack) -> None:
        self.signals = stack.enter_context(checkpoint.StopSignals())
        self.vote = StopVote(trainer.dist)

    def on_step_end(self, trainer) -> None:
        if trainer.stop_requested is None and (signame := self.vote.poll(self.signals.requested)):
            trainer.request_stop(signame)

    def on_epoch_end(self, trainer, figures) -> None:
        if trainer.stop_requested is None and (signame := self.vote.now(self.signals.requested)):
            trainer.request_stop(signame)


# --------------------------------------------------------------------------- metrics files
class MetricsFiles(Callback):
    """metrics.jsonl (one line per epoch: every scalar) and `<table>.jsonl` (one line per epoch and
    layer of every per-layer table); rank 0 writes."""

    def on_epoch_end(self, trainer, figures) -> None:
        if not trainer.dist.is_main:
            return
        epoch, d = trainer.epoch, trainer.stage.dir  # the epoch just completed, 1-based
        artifacts.write_jsonl(d / artifacts.METRICS, trainer.metrics)
        for table, rows in figures.table_rows(epoch).items():
            rewrite_table(d / f"{table}.jsonl", epoch, rows)


class Tracking(Callback):
    """The trackers of runtime.loggers (`pab_framework.tracking`, on rank 0): the stage's tracker
    runs start once training knows where it stands (a resumed stage's trackers get the epochs
    they lack then), and each epoch's metrics.jsonl line and per-layer figures follow. The
    trackers' own threads do the work; the pipeline ends the runs once result.json is written."""

    def on_epoch_start(self, trainer) -> None:
        trainer.stage.trackers.start(trainer.stage, trainer.epochs, trainer.metrics)  # (once: later calls do nothing)

    def on_epoch_end(self, trainer, figures) -> None:
        trainer.stage.trackers.epoch(trainer.metrics[-1], figures.tables)

    def on_fit_end(self, trainer) -> dict:
        trainer.stage.trackers.start(trainer.stage, trainer.epochs, trainer.metrics)  # resumed after its last epoch: still tracked
        return {}


# --------------------------------------------------------------------------- progress
class Progress(Callback):
    """An epoch bar and a batch bar (rich on a terminal, log lines otherwise). Each epoch's line
    shows the training loss, the validation accuracy and the figures recorded with `show=True`."""

    def setup(self, trainer, stack) -> None:
        rep = trainer.stage.reporter
        self.epochs = stack.enter_context(rep.task("epoch", total=trainer.epochs))
        self.batches = stack.enter_context(rep.task("batch", total=trainer.steps_per_epoch))
        self.shown = 0  # epochs the bar shows as done

    def on_epoch_start(self, trainer) -> None:
        self.epochs.advance(trainer.epoch - self.shown)  # a resumed run starts part of the way
        self.shown = trainer.epoch
        self.batches.reset(f"epoch {trainer.epoch + 1}", trainer.steps_per_epoch)
        self.batches.advance(trainer.step)

    def on_step_end(self, trainer) -> None:
        self.batches.advance(1)

    def on_epoch_end(self, trainer, figures) -> None:
        row = trainer.metrics[-1]
        extra = "".join(f"  {k} {_shown(figures.scalars.get(k))}" for k in figures.shown)
        loss, acc = row.get("train_loss"), row.get("val_acc")
        info = f"loss {'-' if loss is None else f'{loss:.4f}'}  val_acc {'-' if acc is None else f'{acc:.4f}'}{extra}"
        self.epochs.advance(1, info=info, log=True)
        self.shown += 1


def _shown(v) -> str:
    """A figure on the progress line: a count as it is, a fraction to 4 significant digits."""
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------- kept weights
class KeepWeights(Callback):
    """Writes the model and masks after each epoch in `epochs` (0: before the first step) to
    `model-epoch<k>.pt`, as model.pt is written: the rewinding points later stages take their
    weights from (`weights_from: {stage, epoch}`). Rank 0 writes."""

    def __init__(self, epochs):
        self.epochs = set(epochs)

    def _write(self, trainer, epoch: int) -> None:
        if epoch in self.epochs and trainer.dist.is_main:
            artifacts.save_model(trainer.stage.dir / artifacts.kept_weights_name(epoch), trainer.model, trainer.masks.as_dict())

    def setup(self, trainer, stack) -> None:
        if 0 in self.epochs and not (trainer.stage.dir / artifacts.kept_weights_name(0)).is_file():
            self._write(trainer, 0)  # before resume (setup runs first): the starting weights

    def on_epoch_end(self, trainer, figures) -> None:
        self._write(trainer, trainer.epoch)


# --------------------------------------------------------------------------- DDP
class RanksAgree(Callback):
    """Under DDP: digests of every rank's final weights and masks, compared. They must be bitwise
    equal (same start, all-reduced gradients, rank 0's buffers); a difference is a bug or a
    non-deterministic plugin, and fails the stage rather than saving rank 0's model silently."""

    def on_fit_end(self, trainer) -> dict:
        dist = trainer.dist
        if not dist.enabled:
            return {}
        mine = {"weights": state_digest(trainer.model.state_dict()), "masks": state_digest(trainer.masks.as_dict())}
        every = dist.gather_object(mine)
        out = {"world_size": dist.world_size, "rank_digests": {k: [d[k] for d in every] for k in mine}}
        for k in mine:
            if len(set(out["rank_digests"][k])) != 1:
                raise TrainingError(f"stage {trainer.stage.stage_id}: the ranks' final {k} differ ({', '.join(d[:12] for d in out['rank_digests'][k])}); "
                                    f"a plugin computes differently on different ranks")
        return out


def standard(extra: Sequence[Callback] = (), *, checkpoints: Callback | None = None, on_nonfinite: str = "stop") -> list[Callback]:
    """The callbacks every training stage runs with (progress, the non-finite policy, the trackers,
    metrics files, stop signals, `checkpoints`: the run's `checkpointing.Checkpointer`, the DDP
    agreement check) around `extra`, the stage's own (a transform's, say), in the order their hooks run.

    At a step's end: progress, `extra`, the stop vote, then the periodic checkpoint.
    At an epoch's end: progress, the trackers, the metrics files, `extra` (a mask changed here is
    in the epoch's checkpoint), the stop vote, then the epoch's checkpoint (a stop requested there
    needs no second one)."""
    return [
        Progress(),
        SkipNonFinite() if on_nonfinite == "skip" else StopOnNonFinite(),
        Tracking(),
        MetricsFiles(),
        *extra,
        StopSignals(),
        *([checkpoints] if checkpoints is not None else []),
        RanksAgree(),
    ]
