"""What an output directory (`runs/`) holds: the experiments (folders of stage directories) and the
grids (folders with a results.json) one level below it, for `pab results runs`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import artifacts

GRID_RESULTS = "results.json"


@dataclass
class Found:
    name: str
    kind: str  # "experiment" or "grid"
    dir: Path
    count: int  # stages of an experiment, runs of a grid
    done: int  # complete stages, ok runs
    note: str = ""  # interrupted stages, failed runs


def _grid(d: Path) -> Found | None:
    try:
        data = json.loads((d / GRID_RESULTS).read_text())
    except (OSError, ValueError):
        return None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        return None
    ok = sum(1 for r in rows if isinstance(r, dict) and r.get("status") == "ok")
    total = int(data.get("runs_total", len(rows)) or len(rows))
    bad = len(rows) - ok
    return Found(str(data.get("grid", d.name)), "grid", d, total, ok, f"{bad} not ok" if bad else "")


def output_contents(root: str | Path) -> list[Found]:
    """The experiments and grids in the folders of `root`, by name."""
    found = []
    for d in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        if (d / GRID_RESULTS).is_file():
            g = _grid(d)
            if g is not None:
                found.append(g)
            continue
        stages = artifacts.experiment_stages(d)
        if stages:
            cut = sum(r.status == "interrupted" for r in stages)
            found.append(Found(d.name, "experiment", d, len(stages), sum(r.status == "complete" for r in stages),
                               f"{cut} interrupted" if cut else ""))
    return found
