"""Statistics over seeds: the one implementation the grid's results table and `pab report` share."""
from __future__ import annotations

import json
import math
import statistics
from typing import Any, Callable, Iterable


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
