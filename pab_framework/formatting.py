"""How pab writes a number for a reader: the terminal tables of the command line and the cells of
`pab report`'s page share these few rules, so one figure reads the same wherever it is shown."""
from __future__ import annotations

import json
import math
from typing import Any


def fixed(v: Any) -> str:
    """A figure in a terminal table: a float to 4 places (0.9123), anything else as it is."""
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def as_written(v: Any) -> str:
    """A value a grid varies, as one would write it in the grid file (0.001, 1e-06, synflow,
    [80,120]); `-` for none."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def readable(v: Any) -> str:
    """A cell of the report: integers with thousands separators, floats to 6 significant digits
    (scientific when very large or small), `-` for none."""
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e7 or abs(v) < 1e-4):
            return f"{v:.4e}"
        return f"{v:.6g}"
    return str(v)


def human_bytes(n: float) -> str:
    """A size in B, KiB, MiB or GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover
