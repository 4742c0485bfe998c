"""Faults at exact points of a training run, for the tests that kill, pause or fail `pab run`.

Installed from outside the product, through its public seams: a callback put into the Trainer's
list where the standard callbacks' step and epoch-end hooks stand (after the metrics files,
before the stage's own callbacks, the stop vote and the checkpoint), and wrappers of the
checkpoint file's `save` / `write_all` and of `os.replace`. The points:

    step:N         after global step N of training (epoch * steps_per_epoch + step)
    epoch-end:N    after epoch N's metrics are written, before its checkpoint
    ckpt-write:N   in the N-th checkpoint save of the process, half of the temporary file written
    ckpt-rotate:N  in the N-th save, between its two renames (only checkpoint.prev.pt stands)

In a subprocess, `sitecustomize.py` beside this file installs what the environment asks:
`PAB_TEST_PAUSE=point:N` prints `PAB_TEST_PAUSED point:N` on stderr there and waits to be killed
(a pause in the training loop first lets the checkpoint write in flight finish);
`PAB_TEST_FAIL=rank:step:N[:crash]` makes that rank fail there with a TrainingError (exit code 2),
or with `:crash` a RuntimeError (a bug: exit code 1);
`PAB_TEST_SIGNAL=rank:point:N:SIGNAME` makes that rank send itself the signal there (SIGKILL: a
worker that dies; SIGUSR2: a cluster's warning before pre-emption or the time limit). With
`PAB_TEST_ONCE=FILE` a fault fires in the first process that reaches it only (it makes FILE), so
that a run the launcher restarts, or a requeued job, goes through.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

from pab_framework import checkpoint
from pab_framework.callbacks import Callback, MetricsFiles
from pab_framework.errors import TrainingError
from pab_framework.trainer import Trainer

PAUSED = "PAB_TEST_PAUSED"


def at(point: str, n: int, action: Callable[..., None], patch=setattr) -> None:
    """Run `action(trainer)` (`action()` at the checkpoint points, in the writer's thread) when
    training reaches `point:n` (module docstring). `patch(obj, name, value)`: how to install
    (pytest's monkeypatch.setattr undoes it after the test)."""
    if point in ("step", "epoch-end"):
        _add_callback(_At(point, n, action), patch)
    elif point == "ckpt-write":
        saves = _count_saves(patch)
        real = checkpoint.write_all

        def write_all(fd, data):
            if saves() == n:
                half = len(data) // 2
                real(fd, data[:half])
                action()
                data = data[half:]
            real(fd, data)

        patch(checkpoint, "write_all", write_all)
    elif point == "ckpt-rotate":
        saves = _count_saves(patch)
        real_replace = os.replace

        def replace(src, dst, *a, **k):
            real_replace(src, dst, *a, **k)
            if Path(dst).name == checkpoint.PREVIOUS and saves() == n:
                action()

        patch(os, "replace", replace)
    else:
        raise ValueError(f"unknown fault point {point!r}")


def _add_callback(cb, patch) -> None:
    """Put `cb` into every Trainer's list where the standard step and epoch-end hooks stand."""
    real = Trainer.fit

    def fit(self):
        where = next((i + 1 for i, c in enumerate(self.callbacks) if isinstance(c, MetricsFiles)), 0)
        self.callbacks.insert(where, cb)
        return real(self)

    patch(Trainer, "fit", fit)


def _count_saves(patch) -> Callable[[], int]:
    """Count the checkpoint saves of this process; returns the count so far."""
    count = [0]
    real = checkpoint.save

    def save(*a, **k):
        count[0] += 1
        return real(*a, **k)

    patch(checkpoint, "save", save)
    return lambda: count[0]


class _At(Callback):
    def __init__(self, point: str, n: int, action):
        self.point, self.n, self.action = point, n, action

    def on_step_end(self, trainer) -> None:
        if self.point == "step" and trainer.epoch * trainer.steps_per_epoch + trainer.step == self.n:
            self.action(trainer)

    def on_epoch_end(self, trainer, figures) -> None:
        if self.point == "epoch-end" and trainer.epoch == self.n:
            self.action(trainer)


def pause(label: str) -> Callable[..., None]:
    """An action: say `PAB_TEST_PAUSED label` on stderr and wait to be killed. In the training
    loop, the checkpoint write in flight is finished first (what was saved is on disk)."""

    def act(trainer=None) -> None:
        if trainer is not None:
            trainer.checkpoints.wait()
        sys.stderr.write(f"{PAUSED} {label}\n")
        sys.stderr.flush()
        while True:  # until the test kills us
            time.sleep(60)

    return act


def fail(rank: int, point: str, n: int, crash: bool) -> Callable[..., None]:
    """An action: on rank `rank`, a TrainingError (or with `crash` a RuntimeError) naming the point."""

    def act(trainer) -> None:
        if trainer.dist.rank != rank:
            return
        if crash:
            raise RuntimeError(f"PAB_TEST_FAIL: rank {rank} crashes at {point} {n}")
        raise TrainingError(f"PAB_TEST_FAIL: rank {rank} fails at {point} {n}")

    return act


def send(signame: str) -> Callable[..., None]:
    """An action: the process sends itself the signal `signame`."""

    def act(trainer) -> None:
        os.kill(os.getpid(), getattr(signal, signame))

    return act


def once(action: Callable[..., None], marker: str | None) -> Callable[..., None]:
    """`action`, done by the first process that gets there while `marker` does not exist (which it makes)."""
    if not marker:
        return action

    def act(*args) -> None:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        action(*args)

    return act


def install_from_env(environ=os.environ) -> None:
    """What PAB_TEST_PAUSE / PAB_TEST_FAIL / PAB_TEST_SIGNAL ask for (module docstring)."""
    marker = environ.get("PAB_TEST_ONCE")
    if want := environ.get("PAB_TEST_PAUSE"):
        point, n = want.rsplit(":", 1)
        at(point, int(n), once(pause(want), marker))
    if want := environ.get("PAB_TEST_FAIL"):
        rank, point, n, *rest = want.split(":")
        at(point, int(n), _on_rank(int(rank), once(fail(int(rank), point, int(n), rest == ["crash"]), marker)))
    if want := environ.get("PAB_TEST_SIGNAL"):
        rank, point, n, signame = want.split(":")
        at(point, int(n), _on_rank(int(rank), once(send(signame), marker)))


def _on_rank(rank: int, action: Callable[..., None]) -> Callable[..., None]:
    """`action` on rank `rank` only (so that only that rank takes the `once` marker)."""

    def act(trainer) -> None:
        if trainer.dist.rank == rank:
            action(trainer)

    return act
