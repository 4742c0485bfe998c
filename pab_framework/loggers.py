"""Per-epoch scalars to the tools people already use, besides the stage's metrics.jsonl.

`runtime.loggers` names them: `jsonl` (metrics.jsonl, which the train stage always writes: reports
and the cache read it), `tensorboard` (event files in the stage's `tb/` folder, through
`torch.utils.tensorboard`; needs the `tensorboard` extra) and `csv` (metrics.csv, rewritten
atomically every epoch). Every logger gets the same scalars as metrics.jsonl: the numbers of each
epoch's row, at step = epoch.

The Trainer's MetricsFiles callback calls `log_epoch(...)` once per epoch, on rank 0 only.
"""
from __future__ import annotations

import atexit
import csv
import importlib.util
import io
import math
from pathlib import Path
from typing import Any

from . import artifacts
from .errors import PabError

TENSORBOARD_HINT = "install it with: pip install 'pab[tensorboard]' (or: pip install tensorboard)"


def _scalars(row: dict) -> dict[str, float]:
    """The plain numbers of a metrics row (no nested dicts, no text, no booleans)."""
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}


def check_available(names: list[str]) -> None:
    """Raise ValueError (for the spec's validation) when a named logger cannot work here."""
    if "tensorboard" in names and importlib.util.find_spec("tensorboard") is None:
        raise ValueError(f"the tensorboard logger needs the tensorboard package, which is not installed; {TENSORBOARD_HINT}")


class CsvLogger:
    """metrics.csv: one row per epoch, every scalar column seen so far; rewritten atomically."""

    def __init__(self, stage_dir: Path):
        self.path = Path(stage_dir) / "metrics.csv"
        self.rows: list[dict] = []
        if self.path.is_file():  # a resumed run keeps the epochs logged before it
            with open(self.path, newline="") as f:
                self.rows = [{k: float(v) if v != "" else float("nan") for k, v in r.items()} for r in csv.DictReader(f)]
            for r in self.rows:
                r["epoch"] = int(r["epoch"])

    def log(self, row: dict) -> None:
        # a resumed run logs an epoch again: the newer row replaces the older ones from there on
        self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]]
        self.rows.append({"epoch": row["epoch"], **_scalars(row)})
        cols: list[str] = []
        for r in self.rows:
            cols += [k for k in r if k not in cols]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()})
        artifacts.atomic_write_text(self.path, buf.getvalue())

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """TensorBoard event files in the stage's tb/ folder, one scalar per metrics.jsonl column."""

    def __init__(self, stage_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise PabError(f"runtime.loggers: the tensorboard logger cannot start ({e}); {TENSORBOARD_HINT}") from None
        self.dir = Path(stage_dir) / "tb"
        self.writer = SummaryWriter(log_dir=str(self.dir))

    def log(self, row: dict) -> None:
        step = int(row["epoch"])
        for k, v in _scalars(row).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# `jsonl` is not here: metrics.jsonl is the train stage's own record, written on every run
LOGGERS: dict[str, type] = {"csv": CsvLogger, "tensorboard": TensorBoardLogger}

# open loggers by stage directory: the train loop calls log_epoch() with no state of its own
_open: dict[Path, list[Any]] = {}


def open_loggers(names: list[str], stage_dir: Path) -> list[Any]:
    return [LOGGERS[n](stage_dir) for n in dict.fromkeys(names) if n in LOGGERS]


def close_loggers(stage_dir: Path | None = None) -> None:
    for d in [Path(stage_dir)] if stage_dir is not None else list(_open):
        for lg in _open.pop(d, []):
            lg.close()


atexit.register(close_loggers)


def log_epoch(stage_dir: str | Path, names: list[str], row: dict, epochs: int | None = None) -> None:
    """Send one epoch's metrics row to the loggers `names`; closes them after epoch `epochs`."""
    d = Path(stage_dir)
    if d not in _open or row["epoch"] <= 1:  # the first epoch of a (re)run starts afresh
        close_loggers(d)
        _open[d] = open_loggers(names, d)
    for lg in _open[d]:
        lg.log(row)
    if epochs is not None and row["epoch"] >= epochs:
        close_loggers(d)
