"""A training run's checkpoints: what one holds, when it is written, how a run resumes from one.

The Trainer runs the loop; its `Checkpointer` (one per run, also a callback among the standard
ones) does the rest, as open_lth keeps `training/checkpointing.py` beside `training/train.py`:

- at the start (`setup`) it resumes from the newest good checkpoint of the stage, if any;
- it writes one every `every_steps` steps within an epoch (optional) and at every epoch's end but
  the last: after the last epoch the stage's model.pt and result.json follow at once and supersede
  any checkpoint (the pipeline discards it), so a crash in that moment resumes from the epoch
  before, losing no more than a crash anywhere in an epoch does;
- on a stop (SIGTERM/SIGINT/SIGUSR2, `request_stop`) it writes one where the loop stands, unless one was
  just written there, and raises `checkpoint.Interrupted` (exit code 3).

Every rank takes part in a save (the running sums are summed over ranks); rank 0 writes, in the
background (`checkpoint.Writer`). A checkpoint holds: the stage id, where training stands (epoch,
step, steps per epoch), the model's state dict, the masks, the optimizer's state, every RNG, the
metrics rows so far, the epoch's running sums (over every rank), the callbacks' states by class
name, the fp16 gradient scaler's state and the seconds spent so far. The file format itself
(header, checksum, rotation) is `pab_framework.checkpoint`'s.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint
from .callbacks import Callback
from .errors import ArtifactError


class Checkpointer(Callback):
    """The checkpoints of one training run of `stage` (a StageContext): see the module docstring.

    The Trainer hands itself to every method: a checkpoint is the Trainer's state, read and
    restored here (`model`, `masks`, `opt`, `epoch`, `step`, `steps_per_epoch`, `epochs`,
    `metrics`, `sums`, `callbacks`, `scaler`, `elapsed()`, `elapsed_before`)."""

    def __init__(self, stage, every_steps: int | None = None):
        self.stage = stage
        self.every = every_steps
        self.writer = checkpoint.Writer()  # one write at a time, in the background
        self.saves = 0  # checkpoints written in this session
        self.last_saved: Path | None = None  # the newest written or resumed from
        self.saved_at: tuple[int, int] | None = None  # (epoch, step) of the last save of this session

    # ------------------------------------------------------------------ when
    def setup(self, trainer, stack) -> None:
        self.resume(trainer)

    def on_step_end(self, trainer) -> None:
        if self.every and trainer.step % self.every == 0 and trainer.step < trainer.steps_per_epoch:
            self.save(trainer)

    def on_epoch_end(self, trainer, figures) -> None:
        if trainer.epoch < trainer.epochs:
            self.save(trainer)

    # ------------------------------------------------------------------ writing
    def save(self, trainer) -> None:
        """Every rank calls this at the same points; rank 0 writes. Callbacks' `before_save` run first."""
        for cb in trainer.callbacks:
            cb.before_save(trainer)
        sums = trainer.sums.reduced(trainer.dist)
        self.saved_at = (trainer.epoch, trainer.step)
        if not trainer.dist.is_main:
            return
        self.saves += 1
        # a host copy now (tens of milliseconds); serialising and writing go on beside training
        snap = checkpoint.snapshot(self.payload(trainer, sums))
        self.last_saved = self.writer.submit(self.stage.dir, self.stage.key, snap)

    def payload(self, trainer, sums: torch.Tensor) -> dict:
        """What a checkpoint holds (module docstring); `sums`: the running sums over every rank."""
        return {
            "stage": self.stage.stage_id,
            "epoch": trainer.epoch,
            "step": trainer.step,
            "steps_per_epoch": trainer.steps_per_epoch,
            "model": dict(trainer.model.state_dict()),
            "masks": trainer.masks.as_dict(),  # (bool already; the snapshot makes the host copy)
            "optimizer": trainer.opt.state_dict(),
            "rng": checkpoint.rng_state(),
            "metrics": list(trainer.metrics),
            # summed over ranks: rank 0 carries them on after a resume, the others start from zero
            "running": {"loss_sum": sums[0].to("cpu", torch.float32), "correct": sums[1].to("cpu", torch.long), "seen": int(sums[2])},
            "callbacks": {type(cb).__name__: st for cb in trainer.callbacks if (st := cb.state_dict()) is not None},
            "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
            "elapsed": trainer.elapsed(),
        }

    def wait(self) -> None:
        """Until the write in flight is on disk; its error, if it failed, is raised here."""
        self.writer.wait()

    def finish_quietly(self) -> None:
        """On the way out after an error: let the write in flight finish; its own failure is logged."""
        try:
            self.writer.wait()
        except Exception as e:  # the error already on its way out is the one to report
            self.stage.reporter.log(f"[yellow]warning[/]: {getattr(e, 'message', None) or e}")

    def interrupt(self, trainer, signame: str) -> None:
        """Stop here: write a checkpoint (unless one was just written here), wait for it, raise Interrupted."""
        if self.saved_at != (trainer.epoch, trainer.step):
            self.save(trainer)
        self.writer.wait()  # "checkpoint written" must be true when it is said
        where = f"epoch {trainer.epoch + 1}, step {trainer.step}" if trainer.step else f"the end of epoch {trainer.epoch}"
        raise checkpoint.Interrupted(  # printed after "stopped: "
            f"{signame} at {where}; checkpoint written to {self.last_saved or self.stage.dir}. "
            f"Run the same command again to resume (exit code {checkpoint.EXIT_INTERRUPTED})."
        )

    # ------------------------------------------------------------------ reading
    def resume(self, trainer) -> None:
        """Load the newest good checkpoint of this stage, if any, and carry on from it."""
        stage = self.stage
        got = checkpoint.load(stage.dir, stage.key, warn=lambda m: stage.reporter.log(f"[yellow]warning[/]: {m}"))
        if got is None:
            return
        ck, path = got
        try:
            self.restore(trainer, ck)
        except ArtifactError as e:
            raise ArtifactError(f"{path}: cannot resume from this checkpoint: {e.message}. Run with --restart to start afresh.") from None
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ArtifactError(f"{path}: cannot resume from this checkpoint ({type(e).__name__}: {msg[:200]}). "
                                "Run with --restart to start afresh.") from None
        self.last_saved = path
        stage.earlier_s = trainer.elapsed_before  # result.json: compute_s counts the interrupted sessions too
        at = f"epoch {trainer.epoch + 1}, step {trainer.step}/{trainer.steps_per_epoch}" if trainer.epoch < trainer.epochs else "the end of training"
        kind = getattr(getattr(stage, "stage", None), "kind", None)
        # the only line about the resume (the pipeline leaves it to the stage, which knows where)
        stage.reporter.log(f"[bold]resuming[/] {stage.stage_id}{f' ({kind})' if kind else ''} from {path} at {at} (--restart starts it afresh)")

    def restore(self, trainer, ck: dict) -> None:
        """Put the state of checkpoint payload `ck` into the trainer (ArtifactError when it does not fit)."""
        if ck.get("steps_per_epoch") != trainer.steps_per_epoch:
            raise ArtifactError(f"it was written with {ck.get('steps_per_epoch')} steps per epoch, this run has {trainer.steps_per_epoch}")
        trainer.model.load_state_dict(ck["model"])
        try:
            trainer.masks.load(ck["masks"])
        except ValueError as e:
            raise ArtifactError(str(e)) from None
        trainer.opt.load_state_dict(ck["optimizer"])
        checkpoint.set_rng_state(ck["rng"])
        trainer.epoch, trainer.step = int(ck["epoch"]), int(ck["step"])
        trainer.metrics = list(ck["metrics"])
        r = ck["running"]
        if trainer.dist.is_main:  # the sums were over every rank: one rank carries them on
            sums = trainer.sums
            sums.loss_sum, sums.correct, sums.seen = r["loss_sum"].to(trainer.device), r["correct"].to(trainer.device), int(r["seen"])
        states = ck.get("callbacks") or {}
        for cb in trainer.callbacks:
            if type(cb).__name__ in states:
                cb.load_state_dict(states[type(cb).__name__])
        if trainer.scaler is not None and ck.get("scaler"):
            trainer.scaler.load_state_dict(ck["scaler"])
        trainer.elapsed_before = float(ck["elapsed"])
