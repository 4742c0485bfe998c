"""`--set key.path=value`: command-line overrides of a spec (or grid) dict, before validation."""
from __future__ import annotations

import copy
from typing import Any

from ..errors import Problem, SpecError
from ..yamlio import parse_scalar


def parse_override(assignment: str) -> tuple[str, Any]:
    """`a.b.c=value` (the value read as YAML) as (key path, value): the one parser of `--set`."""
    if "=" not in assignment:
        raise SpecError([Problem((), f"override {assignment!r} must look like key.path=value", None, "--set")])
    key, raw = assignment.split("=", 1)
    return key.strip(), parse_scalar(raw)


def apply_override(data: dict, assignment: str) -> tuple:
    """Apply `a.b.c=value` to a spec dict in place; returns the key path set."""
    key, value = parse_override(assignment)
    return set_path(data, key, value, assignment)


def set_path(data: dict, key: str, value: Any, label: str | None = None) -> tuple:
    """Set the dotted key path `key` (list indices as numbers) to `value` in place, creating
    missing mappings; returns the key path set. `label` names the override in errors."""
    assignment = label if label is not None else key
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(p == "" for p in parts):
        raise SpecError([Problem((), f"override {assignment!r} has an empty key", None, "--set")])
    path: list = []
    cur: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(cur, list):
            if not part.lstrip("-").isdigit() or not -len(cur) <= int(part) < len(cur):
                raise SpecError([Problem(tuple(path), f"override {assignment!r}: {part!r} is not an index of this list", None, "--set")])
            idx: Any = int(part)
        elif isinstance(cur, dict):
            idx = part
        else:
            raise SpecError([Problem(tuple(path), f"override {assignment!r}: {'.'.join(map(str, path))} is not a mapping", None, "--set")])
        path.append(idx)
        if last:
            cur[idx] = copy.deepcopy(value)
        else:
            if isinstance(cur, dict) and (idx not in cur or cur[idx] is None):
                cur[idx] = {}
            cur = cur[idx]
    return tuple(path)
