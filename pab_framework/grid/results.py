"""A grid's results: one row per run, statistics over seeds, results.json and results.csv."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .. import artifacts
from ..errors import PabError
from ..stats import over_seeds as _over_seeds
from .gridfile import Grid, Run

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"


def stage_counts(rec: dict) -> tuple[int, int, int]:
    """A run's stages: (computed from scratch, resumed from a checkpoint, reused complete)."""
    stages = rec.get("stages", [])
    resumed = sum(1 for s in stages if not s["reused"] and s.get("resumed"))
    reused = sum(1 for s in stages if s["reused"])
    return len(stages) - resumed - reused, resumed, reused


def _row(grid: Grid, run: Run, rec: dict) -> dict:
    ran, resumed, reused = stage_counts(rec)
    return {
        "run": run.index,
        **{k: run.varied[k] for k in grid.varied_keys},
        "status": rec["status"],
        "val_acc": rec.get("val_acc"),
        "density": rec.get("density"),
        "time_s": rec.get("time_s"),
        "stages_ran": ran,
        "stages_resumed": resumed,
        "stages_reused": reused,
        "error": rec.get("error"),
        "stages": {s["stage"]: s["dir"] for s in rec.get("stages", [])},
    }


def over_seeds(varied: list[str], rows: list[dict]) -> list[dict]:
    """Mean and standard deviation (sample, n-1) of the ok runs' val_acc and density, over the
    seeds of every combination of the other varied keys."""
    others = [k for k in varied if k != "seed"]
    return _over_seeds(rows, others, ["val_acc", "density"], ok=lambda r: r["status"] == "ok")


def write_results(grid: Grid, records: dict[int, dict]) -> dict:
    """results.json and results.csv in the grid directory, rewritten atomically."""
    by_index = {r.index: r for r in grid.runs}
    rows = [_row(grid, by_index[i], records[i]) for i in sorted(records)]
    varied = grid.varied_keys
    total_ran = sum(r["stages_ran"] for r in rows)
    total_resumed = sum(r["stages_resumed"] for r in rows)
    total_reused = sum(r["stages_reused"] for r in rows)
    results = {
        "grid": grid.name,
        "grid_file": str(grid.path.resolve()),
        "base": str(grid.base.resolve()),
        "varied": varied,
        "overrides": list(grid.overrides),  # the --set every run had (the grid directory's name says them too)
        "runs_total": len(grid.runs),
        "summary": {
            "runs": len(rows),
            "ok": sum(r["status"] == "ok" for r in rows),
            "failed": sum(r["status"] not in ("ok", "interrupted") for r in rows),
            "interrupted": sum(r["status"] == "interrupted" for r in rows),
            "stages_ran": total_ran,
            "stages_resumed": total_resumed,
            "stages_reused": total_reused,
        },
        "rows": rows,
        "over_seeds": over_seeds(varied, rows) if "seed" in varied else [],
    }
    grid.dir.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write_text(grid.dir / RESULTS_JSON, json.dumps(results, indent=2, allow_nan=False) + "\n")
    buf = io.StringIO()
    cols = ["run", *varied, "status", "val_acc", "density", "time_s", "stages_ran", "stages_resumed", "stages_reused", "error"]
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r.get(c) is None else (json.dumps(r[c]) if isinstance(r[c], (list, dict)) else r[c]) for c in cols])
    artifacts.atomic_write_text(grid.dir / RESULTS_CSV, buf.getvalue())
    return results


def load_results(path: str | Path) -> dict:
    """results.json from a grid directory (or the file itself)."""
    p = Path(path)
    f = p / RESULTS_JSON if p.is_dir() else p
    if not f.is_file():
        raise PabError(f"{path}: no {RESULTS_JSON} here (give the grid directory, <output_dir>/<grid name>/, that `pab grid` wrote)")
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise PabError(f"{f}: not a readable results file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not isinstance(data.get("varied"), list):
        raise PabError(f"{f}: not a pab grid results file")
    return data

