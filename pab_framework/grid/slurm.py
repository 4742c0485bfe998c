"""The submitit executors and sbatch script of a grid, from its `slurm:` options (`SlurmOptions`),
and the job a grid run is there (`PreemptibleRun`: requeued when the cluster pre-empts it)."""
from __future__ import annotations

import math
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from ..errors import PabError, install_command
from .gridfile import Grid
from .model import SlurmOptions

__all__ = ["PreemptibleRun", "SlurmOptions", "make_submitit_executor", "sbatch_script", "slurm_folder", "slurm_parameters"]


def slurm_parameters(grid: Grid, opts: SlurmOptions) -> dict:
    """submitit SlurmExecutor parameters (sbatch options) from the grid's `slurm:` section."""
    p: dict[str, Any] = {"job_name": f"pab-{grid.name}", "time": opts.minutes(), "array_parallelism": opts.array_parallelism}
    for k in ("partition", "gpus_per_node", "cpus_per_task", "account", "qos", "constraint"):
        v = getattr(opts, k)
        if v is not None:
            p[k] = v
    if opts.mem_gb is not None:
        p["mem"] = f"{int(math.ceil(opts.mem_gb))}GB"
    if opts.setup:
        p["setup"] = list(opts.setup)
    if opts.additional:
        p["additional_parameters"] = dict(opts.additional)
    return p


def slurm_folder(grid: Grid) -> Path:
    return grid.dir / "slurm"


def _submitit():
    try:
        import submitit  # optional: the slurm extra
    except ImportError:
        raise PabError(f"the slurm executor needs submitit, which is not installed; install it with: {install_command('slurm')}") from None
    return submitit


def sbatch_script(grid: Grid, n_runs: int | None = None) -> str:
    """The sbatch script `--executor slurm` submits (an array of the runs), built without submitting."""
    _submitit()
    from submitit.slurm.slurm import _make_sbatch_string  # optional: the slurm extra

    folder = slurm_folder(grid) / "%j"
    n = len(grid.runs) if n_runs is None else n_runs
    command = " ".join([sys.executable, "-u -m submitit.core._submit", str(folder)])
    params = slurm_parameters(grid, grid.slurm)
    try:
        return _make_sbatch_string(command=command, folder=folder, map_count=n if n > 1 else None, **params)
    except (ValueError, TypeError) as e:
        raise PabError(f"slurm options are not usable: {e}") from None


def make_submitit_executor(grid: Grid, cluster: str = "slurm"):
    """A submitit executor for the grid: `slurm` (sbatch, array jobs), or `local` / `debug`
    (submitit's own executors on this machine, to try the path without a cluster)."""
    submitit = _submitit()
    folder = slurm_folder(grid) / "%j"
    opts = grid.slurm
    if cluster == "slurm":
        try:
            ex = submitit.SlurmExecutor(folder=folder)
        except RuntimeError as e:
            raise PabError(f"cannot submit to SLURM from here: {e}") from None
        try:
            ex.update_parameters(**slurm_parameters(grid, opts))
        except ValueError as e:
            raise PabError(f"slurm options are not usable: {e}") from None
    elif cluster == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=opts.minutes(), gpus_per_node=opts.gpus_per_node or 0)
    elif cluster == "debug":
        ex = submitit.DebugExecutor(folder=folder)
    else:
        raise PabError(f"unknown submitit cluster {cluster!r}: use slurm, local or debug")
    return ex


class PreemptibleRun:
    """A grid run as a submitit job that the cluster may pre-empt or stop at its time limit,
    through submitit's checkpointing protocol.

    SLURM warns a job with a signal: SIGUSR2 ahead of the time limit (submitit's sbatch asks for
    `--signal=USR2@90`), SIGTERM on a pre-emption (submitit expects SIGUSR2 after it). In
    training, pab takes either: it writes a checkpoint at the next step and the run stops (exit
    code 3's Interrupted, which `run` records as `interrupted`). The job then hands SIGUSR2 on to
    submitit, whose handler asks `checkpoint()` for the same run (a `DelayedSubmission`) and
    requeues the job; the requeued job runs the grid run again, which resumes from pab's
    checkpoint. SIGUSR2 outside training goes to submitit at once (a stage without checkpoints
    starts again)."""

    def __init__(self, run: Callable[[dict], dict]):
        self.run = run  # (payload) -> the run's record

    def __call__(self, payload: dict) -> dict:
        rec = self.run(payload)
        if rec.get("status") == "interrupted":
            _hand_on_to_submitit()
        return rec

    def checkpoint(self, payload: dict) -> Any:
        """submitit's hook: the same run, to be submitted again."""
        return _submitit().helpers.DelayedSubmission(self, payload)


def _hand_on_to_submitit() -> None:
    """Send this process the signal submitit requeues a job on, when submitit's handler for it is
    in place (in a submitit job; never in a plain process, which the signal would end)."""
    sig = getattr(signal, "SIG" + _submitit().JobEnvironment.USR_SIG, None)
    if sig is not None and callable(signal.getsignal(sig)):
        os.kill(os.getpid(), sig)
