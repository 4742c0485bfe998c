"""`--set key.path=value`: command-line overrides of a spec (or grid) dict, before validation."""
from __future__ import annotations

import copy
import difflib
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


def missing_prefix(data: Any, key: str) -> tuple | None:
    """The shortest part of the dotted path `key` that `data` does not hold yet (what a --set of
    it would create), or None when every mapping on the way exists."""
    path: list = []
    cur = data
    for part in key.strip().split("."):
        if isinstance(cur, list) and part.lstrip("-").isdigit() and -len(cur) <= int(part) < len(cur):
            path.append(int(part))
            cur = cur[int(part)]
            continue
        path.append(part)
        if not isinstance(cur, dict) or cur.get(part) is None:
            return tuple(path)
        cur = cur[part]
    return None


def _get(data: Any, path: tuple) -> Any:
    for p in path:
        data = data[p] if isinstance(data, (dict, list)) else None
    return data


def _paths_ending(data: Any, key: str, at: tuple = ()) -> list[tuple]:
    """Every key path in `data` whose last key is `key`."""
    out = []
    if isinstance(data, dict):
        for k, v in data.items():
            if k == key:
                out.append(at + (k,))
            out += _paths_ending(v, key, at + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _paths_ending(v, key, at + (i,))
    return out


def _dotted(path: tuple) -> str:
    return ".".join(map(str, path))


def explain(problems: list, data: Any, overridden: dict[tuple, str], created: dict[tuple, str]) -> list:
    """Problems a --set caused, said as what the --set did: a key it created where the spec has a
    close one (a typo) gets a problem of its own with a "did you mean"; a plugin's `name` it changed while
    the section kept the old plugin's keys is one problem saying that a key merges and a mapping
    replaces; an unknown key it set is pointed at the paths where that key does stand."""
    out = list(problems)
    for pre, label in created.items():
        siblings = [str(k) for k in (_get(data, pre[:-1]) or {}) if k != pre[-1]]
        close = difflib.get_close_matches(str(pre[-1]), siblings, n=1, cutoff=0.75)
        if close and any(tuple(p[0][: len(pre)]) == pre for p in out):  # (the problems under it stay: a new stage may be meant)
            out.insert(0, (pre, f"{label!r} creates {_dotted(pre)}, which the spec does not have; did you mean {close[0]!r}? "
                                f"(here: {', '.join(siblings)})"))
    for path, label in overridden.items():
        if path and path[-1] in ("name", "kind"):
            section = path[:-1]
            stale = [p for p in out if len(p[0]) == len(path) and tuple(p[0][:-1]) == section and p[1].startswith("unknown key")
                     and tuple(p[0]) not in overridden]
            if stale:
                out = [p for p in out if p not in stale]
                keys = ", ".join(str(p[0][-1]) for p in stale)
                out.append((path, f"{_dotted(section)} now names {_get(data, path)!r}, which takes no {keys}: those keys stay in the "
                                  f"section from the spec, since a --set of one key merges into it; a mapping given whole replaces it: "
                                  f"--set '{_dotted(section)}={{{path[-1]}: {_get(data, path)}, ...}}'"))
    for i, (path, msg) in enumerate(out):
        if tuple(path) in overridden and msg.startswith("unknown key") and "did you mean" not in msg:
            there = [p for p in _paths_ending(data, path[-1]) if p != tuple(path)][:3]
            if there:
                out[i] = (path, msg.replace(f"unknown key {path[-1]!r}", f"unknown key {path[-1]!r}; did you mean "
                                            f"{' or '.join(_dotted(p) for p in there)}?", 1))
    return out
