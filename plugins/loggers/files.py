"""Trackers that are files in the stage directory: `csv` (metrics.csv) and `tensorboard` (event
files under tb/). Each takes the same scalars as metrics.jsonl, at step = epoch."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from pab_framework import artifacts
from pab_framework.errors import PabError, install_command
from pab_framework.tracking import needs_package

TENSORBOARD_HINT = f"install it with: {install_command('tensorboard')} (or: pip install tensorboard)"


class _NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _CsvFile:
    """metrics.csv's rows so far (a resumed stage's file is read back), rewritten atomically at every epoch."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = []
        if path.is_file():
            with open(path, newline="") as f:
                self.rows = [{k: float(v) if v != "" else float("nan") for k, v in r.items()} for r in csv.DictReader(f)]
            for r in self.rows:
                r["epoch"] = int(r["epoch"])

    def log(self, epochs: list) -> None:
        for e in epochs:
            self.rows = [r for r in self.rows if r["epoch"] < e.epoch]  # an epoch sent again replaces the older rows from there on
            self.rows.append({"epoch": e.epoch, **e.scalars})
        cols: list[str] = []
        for r in self.rows:
            cols += [k for k in r if k not in cols]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()})
        artifacts.atomic_write_text(self.path, buf.getvalue())


class Csv:
    """metrics.csv in the stage directory: one row per epoch, every scalar column seen so far.

    Rewritten atomically after every epoch; a resumed stage keeps the rows of its earlier sessions."""

    Params = _NoParams

    def start(self, params, conn, run) -> _CsvFile:
        return _CsvFile(Path(run.dir) / "metrics.csv")

    def log_epochs(self, params, handle: _CsvFile, epochs: list) -> None:
        handle.log(epochs)

    def run_id(self, params, handle: _CsvFile) -> str:
        return handle.path.name  # the same file goes on after a resume


class TensorBoard:
    """TensorBoard event files in the stage's tb/ folder, one scalar per metrics.jsonl column.

    Needs the tensorboard package (`pip install 'pab[tensorboard]'`); `tensorboard --logdir runs/`
    shows every stage."""

    Params = _NoParams

    def spec_problems(self, params, spec) -> list:
        return needs_package("tensorboard", "tensorboard")

    def start(self, params, conn, run):
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional: the tensorboard extra
        except ImportError as e:
            raise PabError(f"the tensorboard logger cannot start ({e}); {TENSORBOARD_HINT}") from None
        return SummaryWriter(log_dir=str(Path(run.dir) / "tb"))

    def log_epochs(self, params, writer, epochs: list) -> None:
        for e in epochs:
            for k, v in e.scalars.items():
                writer.add_scalar(k, v, e.epoch)
        writer.flush()

    def finish(self, params, writer, status: str) -> None:
        writer.close()

    def run_id(self, params, writer) -> str:
        return "tb"  # a resumed stage adds to the same folder
