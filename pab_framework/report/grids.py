"""A grid's section of the report: val_acc against density, one line per combination of the other
varied keys (seeds aside), mean ± sample standard deviation over seeds, and a table of the same
numbers. It reads the grid's results.json (or results.csv)."""
from __future__ import annotations

import csv
from pathlib import Path

from .. import artifacts
from ..errors import ArtifactError
from ..formatting import as_written, readable
from ..grid import short_names
from ..stats import grid_summary, independent_of_density
from .draw import density_figure
from .page import Section, Table, slug

GRID_FILES = ("results.json", "results.csv")


def read_grid_rows(d: Path) -> tuple[list[dict], list[str] | None, Path]:
    """The rows of a grid's results.json (`{"rows": [...], "varied": [...]}` or a list of rows)
    or results.csv, and the varied keys when the file names them."""
    jp, cp = d / GRID_FILES[0], d / GRID_FILES[1]
    if jp.is_file():
        data = artifacts.read_json(jp)
        rows = data.get("rows", data.get("results")) if isinstance(data, dict) else data
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ArtifactError(f"{jp}: expected a list of rows (objects), got {type(rows).__name__}")
        varied = data.get("varied") if isinstance(data, dict) and isinstance(data.get("varied"), list) else None
        return rows, varied, jp
    try:
        with open(cp, newline="") as f:
            return [dict(r) for r in csv.DictReader(f)], None, cp
    except OSError as e:
        raise ArtifactError(f"{cp}: cannot read ({e})") from None


def _label(values: list, keys: list[str]) -> str:
    if not keys:
        return "all runs"
    if len(keys) == 1:
        return readable(values[0])
    return ", ".join(f"{n}={readable(v)}" for n, v in zip(short_names(keys), values))


def _four(v) -> str:
    return f"{v:.4f}"


def grid_section(d: Path) -> Section:
    rows, varied, src = read_grid_rows(d)
    groups, used = grid_summary(rows, varied)
    sec = Section(f"grid: {d.name}", str(src))
    if not groups:
        sec.notes.append(f"No completed rows with val_acc and density in {src.name} ({len(rows)} rows).")
        return sec
    lines: dict[str, list[dict]] = {}
    for g in groups:
        lines.setdefault(_label(g["line"], used["lines"]), []).append(g)
    references = {k: gs for k, gs in lines.items() if independent_of_density(gs)}
    curves = {k: gs for k, gs in lines.items() if k not in references}
    heads = short_names(used["lines"]) if used["lines"] else []
    legend_title = ", ".join(heads) if heads else None
    sec.figures.append(density_figure(f"grid_{slug(d.name)}_val_acc", "val_acc against density" + (f", per {legend_title}" if legend_title else ""),
                                      curves or lines, f"density ({used['density']}; fraction of weights kept)", legend_title,
                                      references if curves else None))
    sec.tables.append(Table("grid", "val_acc per " + " and ".join([*heads, "density"]),
                            [*heads, "density", "seeds", "val_acc mean (fraction correct)", "val_acc std", "density reached (mean)"],
                            [[*g["line"], g["density"], g["n"], g["mean"], g["std"], g["kept"]] for g in groups],
                            f"Grouped by {', '.join(used['lines']) or '(nothing else varied)'} and {used['density']}, in the order of the "
                            f"grid's runs (as `pab results` lists them); {used['skipped']} row(s) without a result were left out. "
                            f"The density column is the grid's value; `density reached` is what the runs' masks kept.",
                            formats=[*([None] * len(heads)), as_written, None, _four, _four, _four]))
    return sec
