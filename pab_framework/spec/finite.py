"""Non-finite numbers (and keys that are not text) in a spec dict: named once, then left out of
what is validated, so nothing downstream reports them again or has to cope with them."""
from __future__ import annotations

import math
from typing import Any

from .problems import Found


def _text_key(k: Any) -> bool:
    return isinstance(k, (str, int)) and not isinstance(k, bool)


def finite_problems(data: Any, path: tuple = ()) -> Found:
    """Every non-finite number in `data`, and every key that is not text, with its key path."""
    out = []
    if isinstance(data, dict):
        for k, v in data.items():
            if not _text_key(k):
                out.append((path, f"key {k!r} must be text"))
            out += finite_problems(v, path + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += finite_problems(v, path + (i,))
    elif isinstance(data, float) and not math.isfinite(data):
        out.append((path, f"must be a finite number (got {data})"))
    return out


def without_nonfinite(data: Any) -> Any:
    """`data` with every non-finite number replaced by None and every key that is not text left out."""
    if isinstance(data, dict):
        return {k: without_nonfinite(v) for k, v in data.items() if _text_key(k)}
    if isinstance(data, list):
        return [without_nonfinite(v) for v in data]
    return None if isinstance(data, float) and not math.isfinite(data) else data
