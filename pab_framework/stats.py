"""Statistics over seeds: the one implementation the grid's results table and `pab report` share
(mean and sample std per group of runs; val_acc against density for a grid's curves)."""
from __future__ import annotations

import json
import math
import statistics
from typing import Any, Callable, Iterable

from .errors import ArtifactError


def mean_std(xs: Iterable[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1; 0 for a single value); (None, None) for none."""
    xs = [float(x) for x in xs]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def number(v: Any) -> float | None:
    """`v` as a finite float (numbers, or text such as a CSV cell), else None."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def over_seeds(rows: list[dict], by: list[str], values: list[str], ok: Callable[[dict], bool] = lambda r: True) -> list[dict]:
    """Rows grouped by their values of the keys `by`, in order of first appearance. Per group:
    the `by` values, `seeds` (rows in the group), `ok` (rows for which `ok(row)` holds), and for
    each key in `values` its mean and sample standard deviation over the ok rows that have a
    number there (`<key>_mean`, `<key>_std`; None when none has)."""
    groups: dict[str, dict] = {}
    for r in rows:
        gkey = json.dumps([r.get(k) for k in by], sort_keys=True, default=str)
        g = groups.setdefault(gkey, {"values": {k: r.get(k) for k in by}, "rows": []})
        g["rows"].append(r)
    out = []
    for g in groups.values():
        good = [r for r in g["rows"] if ok(r)]
        row = dict(g["values"])
        row["seeds"] = len(g["rows"])
        row["ok"] = len(good)
        for v in values:
            row[f"{v}_mean"], row[f"{v}_std"] = mean_std(x for x in (number(r.get(v)) for r in good) if x is not None)
        out.append(row)
    return out


# a grid's row that holds no result: left out of the curves
FAILED = {"failed", "error", "errored", "pending", "running", "skipped", "cancelled", "incomplete", "interrupted"}
# the columns of a grid's results that are figures or bookkeeping, not keys the grid varies
RESULT_KEYS = {"run", "status", "val_acc", "density", "time_s", "stages_ran", "stages_resumed", "stages_reused", "error", "stages", "job_id"}


def grid_summary(rows: list[dict], varied: list[str] | None = None) -> tuple[list[dict], dict]:
    """Mean and sample std of val_acc over seeds, per density and per combination of the other
    varied keys (a line each), the lines in the order the rows first name them (the order of the
    grid's runs, as the command line's table), each line's densities in ascending order. Returns
    (groups, keys used): each group has `line` (the other keys' values), `density`, `n`, `mean`,
    `std`, and `kept` (the mean of the density the runs reached, None when not recorded)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    if varied is None:  # keys whose values differ between rows, results aside
        varied = [k for k in keys if k not in RESULT_KEYS and len({json.dumps(r.get(k), default=str) for r in rows}) > 1]
    dk = next((k for k in varied if k.split(".")[-1] == "density"), None) or ("density" if "density" in keys else None)
    if dk is None:
        raise ArtifactError("grid results have no density column (looked for a varied *.density key and density)")
    line_keys = [k for k in varied if k not in (dk, "seed")]

    def ok(r: dict) -> bool:
        return str(r.get("status", "") or "").lower() not in FAILED and number(r.get("val_acc")) is not None and number(r.get(dk)) is not None

    good = [dict(r, _x=number(r[dk])) for r in rows if ok(r)]
    stats = over_seeds(good, [*line_keys, "_x"], ["val_acc", "density"])
    out = [{"line": [g[k] for k in line_keys], "density": g["_x"], "n": g["ok"], "mean": g["val_acc_mean"], "std": g["val_acc_std"],
            "kept": g["density_mean"]} for g in stats]
    first: dict[str, int] = {}
    for g in out:
        first.setdefault(json.dumps(g["line"], default=str), len(first))
    out.sort(key=lambda g: (first[json.dumps(g["line"], default=str)], g["density"]))
    return out, {"lines": line_keys, "density": dk, "skipped": len(rows) - len(good)}


def independent_of_density(groups: list[dict]) -> bool:
    """Whether a line's runs all reached the same density whatever the grid's density was (a
    dense baseline, say): drawn as a reference, not as a curve across the densities."""
    kept = {g.get("kept") for g in groups}
    return len(groups) > 1 and len(kept) == 1 and None not in kept and {g["density"] for g in groups} != kept
