"""`wandb`: every training stage a Weights & Biases run, in the group of its grid (or spec), so that
W&B's grouped table is the grid's: the resolved spec as its config, the stage's identity and grid
axes as its tags, every metrics.jsonl figure and per-layer figure in its history at step = epoch,
spec.yaml, model.pt and result.json saved with it, and the status the stage ended with. Needs
`pip install 'pab[wandb]'`; `mode: offline` keeps runs on disk for `wandb sync`."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from pab_framework.tracking import FINISHED, KILLED, needs_package

_TAG = 64  # W&B's longest tag


@dataclass
class _Conn:
    wandb: Any  # the module
    dir: Path
    group: str


class WandB:
    """Weights & Biases: each training stage a run (the spec as config, the figures as history, the files saved with it).

    Runs go into `project`, grouped by the grid (under `pab grid`) or the spec; `mode: offline`
    (or WANDB_MODE) keeps them on disk under `dir` for `wandb sync`."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        project: str = Field("pab", min_length=1, description="The W&B project.")
        entity: Optional[str] = Field(None, min_length=1, description="The W&B team or user (default: your default entity).")
        mode: Optional[Literal["online", "offline", "disabled"]] = Field(
            None, description="online, offline (runs kept on disk for `wandb sync`) or disabled; default: WANDB_MODE, else online.")
        dir: Optional[str] = Field(None, min_length=1, description="Where W&B keeps its files (wandb/ inside it); default: runtime.output_dir. "
                                   "Relative to the spec file.")
        group: Optional[str] = Field(None, min_length=1, description="The runs' group (default: the grid's name under pab grid, else the spec's).")
        tags: list[str] = Field(default_factory=list, description="More tags for every run.")

    def spec_problems(self, params, spec) -> list:
        return needs_package("wandb", "wandb")

    def connect(self, params, scope) -> _Conn:
        import wandb  # optional: the wandb extra (imported on the tracker's thread)

        wandb.setup()  # W&B's service process, started before the first stage rather than in it
        online = (params.mode or os.environ.get("WANDB_MODE") or "online") in ("online", "run", "shared")
        if online and not wandb.login(prompt=False, verify=False):  # (W&B would ask on the terminal, from this thread, mid-run)
            raise RuntimeError("not logged in to W&B: run `wandb login` or set WANDB_API_KEY, or log offline (mode: offline)")
        d = Path(params.dir).expanduser() if params.dir else scope.output_dir
        d = d if d.is_absolute() else (scope.base_dir / d).resolve()
        d.mkdir(parents=True, exist_ok=True)
        return _Conn(wandb, d, params.group or scope.experiment)

    def start(self, params, conn: _Conn, run):
        wandb = conn.wandb
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True, save_code=False, x_save_requirements=False)
        tags = [*params.tags, *(f"{k}={v}" for k, v in run.tags.items() if k not in ("pab.dir", "pab.key"))]
        return wandb.init(project=params.project, entity=params.entity, mode=params.mode, dir=str(conn.dir), group=conn.group,
                          job_type=run.kind, name=run.name, config={**run.params, "pab.key": run.key, "pab.dir": str(run.dir)},
                          tags=[t[:_TAG] for t in tags], id=run.resume_id, resume="allow" if run.resume_id else None,
                          reinit="create_new", settings=settings)

    def log_epochs(self, params, r, epochs: list) -> None:
        for e in epochs:
            layers = {f"{t}/{layer}/{k}": v for t, rows in e.layers.items() for layer, cols in rows.items() for k, v in cols.items()}
            r.log({**e.scalars, **layers}, step=e.epoch)

    def log_artifacts(self, params, r, files: list) -> None:
        for f in files:  # copied into the run's own files (W&B would link them), then saved with it
            dest = Path(r.dir) / Path(f).name
            shutil.copyfile(f, dest)
            r.save(str(dest), base_path=r.dir, policy="now")

    def finish(self, params, r, status: str) -> None:
        r.summary["pab.status"] = status
        r.finish(exit_code=0 if status == FINISHED else 3 if status == KILLED else 1)

    def run_id(self, params, r) -> str:
        return r.id
