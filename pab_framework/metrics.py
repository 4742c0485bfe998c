"""The metrics sink: the one way anything inside a training run records its figures.

Each epoch, the Trainer, the optimizer, the transforms and the callbacks record into one
`MetricsSink`:

- `sink.scalar(name, value)`: one number per epoch. It becomes a column of `metrics.jsonl`, goes to
  the trackers (`runtime.loggers`) and is drawn by `pab report` as a curve. With `show=True` it is
  also shown on the epoch's progress line, after the loss and the accuracy (`sink.scalars(values,
  show=(name, ...))` likewise).
- `sink.layers({param_name: {column: value}}, table="layers")`: per-layer figures. Each table goes
  to `<table>.jsonl`, one line per epoch and layer (`{"epoch", "layer", column: value, ...}`);
  `pab report` draws every numeric column of every table, one line per layer.

Values may be Python numbers or tensors of one element on any device: the tensors of an epoch
are read with one transfer per device at the epoch's end, so recording never synchronises a step.
Nothing here knows any plugin's names: a new plugin's figures flow through unchanged.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Union

import torch

from . import artifacts
from .errors import TrainingError

Number = Union[int, float, bool, torch.Tensor]

METRICS_TABLE = "metrics"  # metrics.jsonl: the scalars, one line per epoch
DEFAULT_TABLE = "layers"  # layers.jsonl: per-layer figures of plugins that do not name a table
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
TABLE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass
class EpochFigures:
    """What one epoch recorded: scalars in recording order, per-layer tables, and the names of the
    scalars to show on the progress line."""

    scalars: dict[str, float | int] = field(default_factory=dict)
    tables: dict[str, dict[str, dict[str, float | int]]] = field(default_factory=dict)
    shown: tuple[str, ...] = ()

    def table_rows(self, epoch: int) -> dict[str, list[dict]]:
        """`<table>.jsonl` lines of this epoch (1-based `epoch`)."""
        return {t: [{"epoch": epoch, "layer": layer, **cols} for layer, cols in rows.items()] for t, rows in self.tables.items()}


class MetricsSink:
    """Scalars and per-layer figures of the epoch in progress (see the module docstring)."""

    def __init__(self, reserved: tuple[str, ...] = ()):
        self._reserved = frozenset(reserved)
        self._scalars: dict[str, Number] = {}
        self._tables: dict[str, dict[str, dict[str, Number]]] = {}
        self._shown: list[str] = []

    def scalar(self, name: str, value: Number, *, show: bool = False) -> None:
        """Record one number of this epoch under `name` (a column of metrics.jsonl); `show`: on the
        progress line too."""
        if not isinstance(name, str) or not NAME.match(name):
            raise ValueError(f"metric name {name!r} must be letters, digits, '_', '.', '-' (starting with a letter or '_')")
        if name in self._reserved or name in self._scalars:
            raise TrainingError(f"the metric {name!r} was recorded twice in one epoch (or clashes with the trainer's own); "
                                "two plugins must record under different names")
        self._scalars[name] = value
        if show:
            self._shown.append(name)

    def scalars(self, values: Mapping[str, Number], *, show: tuple[str, ...] = ()) -> None:
        """Record several; those named in `show` go on the progress line too."""
        for k, v in values.items():
            self.scalar(k, v, show=k in show)

    def layers(self, values: Mapping[str, Mapping[str, Number]], table: str = DEFAULT_TABLE) -> None:
        """Record per-layer figures of this epoch: `{parameter name: {column: value}}` into `<table>.jsonl`."""
        if not isinstance(table, str) or not TABLE_NAME.match(table) or table == METRICS_TABLE:
            raise ValueError(f"table name {table!r} must be lower-case letters, digits and '_', and not {METRICS_TABLE!r}")
        rows = self._tables.setdefault(table, {})
        for layer, cols in values.items():
            row = rows.setdefault(str(layer), {})
            for k, v in cols.items():
                if not isinstance(k, str) or not NAME.match(k) or k in ("epoch", "layer"):
                    raise ValueError(f"column name {k!r} of table {table!r} is not allowed")
                if k in row:
                    raise TrainingError(f"the per-layer figure {table}.{k} of {layer} was recorded twice in one epoch")
                row[k] = v

    def collect(self) -> EpochFigures:
        """Everything recorded since the last collect, tensors read to Python numbers (one
        transfer per device); the sink is empty afterwards."""
        tensors: list[torch.Tensor] = []

        def slot(v: Number):
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    raise ValueError(f"a recorded tensor must hold one number (got shape {tuple(v.shape)})")
                tensors.append(v.detach().reshape(()))
                return _Pending(len(tensors) - 1)
            return v

        scalars = {k: slot(v) for k, v in self._scalars.items()}
        tables = {t: {layer: {k: slot(v) for k, v in cols.items()} for layer, cols in rows.items()} for t, rows in self._tables.items()}
        shown = tuple(self._shown)
        self._scalars, self._tables, self._shown = {}, {}, []
        values = _to_host(tensors)

        def done(v):
            v = values[v.i] if isinstance(v, _Pending) else v
            return int(v) if isinstance(v, bool) else missing_if_nonfinite(v)

        return EpochFigures({k: done(v) for k, v in scalars.items()},
                            {t: {layer: {k: done(v) for k, v in cols.items()} for layer, cols in rows.items()} for t, rows in tables.items()},
                            shown)


def missing_if_nonfinite(v):
    """A figure as JSON can hold it: a float that is not finite (a diverged loss) becomes None, a
    missing figure (JSON has no NaN); anything else is itself."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def finite_figures(row: dict) -> dict:
    """`row` with every non-finite float a missing figure (`missing_if_nonfinite`)."""
    return {k: missing_if_nonfinite(v) for k, v in row.items()}


@dataclass(frozen=True)
class _Pending:
    i: int


def _to_host(tensors: list[torch.Tensor]) -> list[float | int]:
    """The values of 0-dim tensors as Python numbers, with one device-to-host copy per device and dtype kind."""
    out: list[float | int] = [0] * len(tensors)
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        kind = "f" if t.is_floating_point() or t.is_complex() else "i"
        groups.setdefault((t.device, kind), []).append(i)
    for (_, kind), idx in groups.items():
        dtype = torch.float64 if kind == "f" else torch.int64
        vals = torch.stack([tensors[i].to(dtype) for i in idx]).tolist()
        for i, v in zip(idx, vals):
            out[i] = v
    return out


def rewrite_table(path: Path, epoch: int, rows: list[dict]) -> None:
    """Rewrite a per-epoch jsonl file with the lines of epochs before `epoch` (1-based) and `rows`:
    a resumed run that logs an epoch again replaces it instead of duplicating it."""
    kept = [r for r in artifacts.read_jsonl(path) if r.get("epoch", 0) < epoch]
    artifacts.write_jsonl(path, [*kept, *rows])


def table_files(stage_dir: Path) -> dict[str, Path]:
    """The per-layer tables a training stage wrote: table name -> `<table>.jsonl` (not metrics.jsonl)."""
    out = {}
    for p in sorted(Path(stage_dir).glob("*.jsonl")):
        name = p.name[: -len(".jsonl")]
        if name != METRICS_TABLE and TABLE_NAME.match(name):
            out[name] = p
    return out
