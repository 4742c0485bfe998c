"""SLURM options of a grid file and the submitit executors built from them."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..errors import PabError

if TYPE_CHECKING:  # pragma: no cover
    from .gridfile import Grid


def _minutes(v: Union[int, str]) -> int:
    """SLURM time: minutes, or "MM:SS", "HH:MM:SS", "D-HH:MM:SS", "D-HH"."""
    if isinstance(v, int):
        return v
    s = str(v).strip()
    days = 0
    if "-" in s:
        d, s = s.split("-", 1)
        days = int(d)
        parts = [int(x) for x in s.split(":")]
        parts += [0] * (3 - len(parts))
        h, m, sec = parts
    else:
        parts = [int(x) for x in s.split(":")]
        if len(parts) == 1:
            return parts[0]
        if len(parts) == 2:
            h, m, sec = 0, parts[0], parts[1]
        else:
            h, m, sec = parts
    return days * 1440 + h * 60 + m + (1 if sec else 0)


class SlurmOptions(BaseModel):
    """The grid file's `slurm:` section (command-line flags override it)."""

    model_config = ConfigDict(extra="forbid")
    partition: Optional[str] = Field(None, description="SLURM partition.")
    time: Union[int, str] = Field(60, description="Time limit per run: minutes, or HH:MM:SS / D-HH:MM:SS.")
    gpus_per_node: Optional[int] = Field(None, ge=0, le=64, description="GPUs per run.")
    cpus_per_task: Optional[int] = Field(None, ge=1, le=1024, description="CPUs per run.")
    mem_gb: Optional[float] = Field(None, gt=0, description="Memory per run, in GB.")
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    array_parallelism: int = Field(256, ge=1, description="At most this many runs of the array at once.")
    setup: list[str] = Field(default_factory=list, description="Shell lines run in the job before the run (module load, conda activate).")
    additional: dict[str, Any] = Field(default_factory=dict, description="Any other sbatch option, e.g. {mail-type: END}.")

    def minutes(self) -> int:
        try:
            m = _minutes(self.time)
        except ValueError:
            raise PabError(f"slurm time {self.time!r} is not minutes or [D-]HH:MM:SS") from None
        if m <= 0:
            raise PabError(f"slurm time {self.time!r} must be positive")
        return m



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
        import submitit
    except ImportError:
        raise PabError("the slurm executor needs submitit: pip install 'pab[slurm]'") from None
    return submitit


def sbatch_script(grid: Grid, n_runs: int | None = None) -> str:
    """The sbatch script `--executor slurm` submits (an array of the runs), built without submitting."""
    _submitit()
    from submitit.slurm.slurm import _make_sbatch_string

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


