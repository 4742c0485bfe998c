"""What tells the stages of one experiment apart: the values in which the resolved specs that made
them differ, as a short text (`seed=5`, `stages.train.epochs=3`) that `pab results` shows in a
column and `pab report` puts in its headings and legends.

Stages are compared with the other stages of the same id in the same experiment. Only what can
change a stage's result is compared: the top-level sections (seed, model, data), the numerics of
`runtime` (AMP), and the sections of the stage itself and of the stages it starts from; `vars`
are left out (they show through the values they set), and so is the rest of `runtime` (it says
where a stage ran, not what it computed).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Hashable, Iterable

from .formatting import as_written

SKIPPED_TOP = ("name", "vars", "runtime", "stages")
RUNTIME_NUMERICS = ("amp", "batch_size_is")
MAX_ITEMS = 3  # a label names at most this many differences, then "+N more"


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as {dotted path: value}, a list of mappings (transforms) by index; other
    lists and empty mappings are values."""
    if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        obj = {str(i): v for i, v in enumerate(obj)}
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def lineage(spec: dict, stage_id: str) -> list[str]:
    """`stage_id` and every stage it starts from (after, masks_from, weights_from), transitively,
    in the order the spec writes them."""
    stages = spec.get("stages") or {}
    seen: set[str] = set()
    todo = [stage_id]
    while todo:
        sid = todo.pop()
        if sid in seen or not isinstance(stages.get(sid), dict):
            continue
        seen.add(sid)
        st = stages[sid]
        todo += [a for a in st.get("after") or [] if isinstance(a, str)]
        for k in ("masks_from", "weights_from"):
            src = st.get(k)
            if isinstance(src, dict) and isinstance(src.get("stage"), str):
                todo.append(src["stage"])
    return [sid for sid in stages if sid in seen]


def relevant(spec: dict, stage_id: str) -> dict[str, Any]:
    """The flattened values of `spec` that can change what stage `stage_id` computes."""
    flat: dict[str, Any] = {}
    for k, v in spec.items():
        if k not in SKIPPED_TOP:
            flat.update(flatten(v, k))
    runtime = spec.get("runtime") or {}
    for k in RUNTIME_NUMERICS:
        if k in runtime:
            flat[f"runtime.{k}"] = runtime[k]
    for sid in lineage(spec, stage_id):
        flat.update(flatten(spec["stages"][sid], f"stages.{sid}"))
    return flat


def _same(flats: list[dict[str, Any]], path: str) -> bool:
    return len({json.dumps(f[path], sort_keys=True, default=str) if path in f else "\0absent" for f in flats}) <= 1


def _collapse(path: str, flats: list[dict[str, Any]]) -> str:
    """The shortest prefix of `path` (below its stage's section) that some spec lacks entirely: a
    section present in one spec and absent in another is one difference, not one per key."""
    parts = path.split(".")
    start = 3 if parts[0] == "stages" else 1
    for n in range(start, len(parts)):
        prefix = ".".join(parts[:n])
        if any(not any(p == prefix or p.startswith(prefix + ".") for p in f) for f in flats):
            return prefix
    return path


def _item(path: str, flat: dict[str, Any]) -> str:
    if path in flat:
        return f"{path}={as_written(flat[path])}"
    under = {p[len(path) + 1:]: v for p, v in flat.items() if p.startswith(path + ".")}
    if not under:
        return f"{path}=none"
    for name in ("name", "0.name"):  # a plugin section, or a list of them
        if name in under:
            return f"{path}.{name}={as_written(under[name])}"
    return f"{path}=set"


def differing_paths(flats: list[dict[str, Any]]) -> list[str]:
    """The paths (sections collapsed, see `_collapse`) whose values are not the same in all of `flats`."""
    paths = list(dict.fromkeys(p for f in flats for p in f))
    out: list[str] = []
    for p in paths:
        if _same(flats, p):
            continue
        c = _collapse(p, flats)
        if c not in out:
            out.append(c)
        if c != p and not _same([f for f in flats if p in f], p) and p not in out:  # it differs among the specs that have it, too
            out.append(p)
    return out


def label(paths: list[str], flat: dict[str, Any], max_items: int = MAX_ITEMS) -> str:
    """`seed=5, stages.train.epochs=3`: this spec's values of `paths`, the first `max_items` of them."""
    absent = [p for p in paths if not any(q == p or q.startswith(p + ".") for q in flat)]
    items = [_item(p, flat) for p in paths if not any(p.startswith(a + ".") for a in absent)]
    if len(items) > max_items:
        return ", ".join(items[:max_items]) + f" (+{len(items) - max_items} more)"
    return ", ".join(items)


def what_differs(stages: Iterable[tuple[Hashable, str, dict, Hashable]]) -> dict[Hashable, str]:
    """For stages given as (id, stage id, resolved spec, experiment): what tells each apart from
    the other stages of the same experiment and stage id ("" when it is the only one, or when
    their specs agree)."""
    groups: dict[tuple, list[tuple[Hashable, dict]]] = {}
    for ident, sid, spec, experiment in stages:
        groups.setdefault((experiment, sid), []).append((ident, relevant(spec, sid)))
    out: dict[Hashable, str] = {}
    for members in groups.values():
        paths = differing_paths([f for _, f in members]) if len(members) > 1 else []
        for ident, flat in members:
            out[ident] = label(paths, flat)
    return out


def stage_labels(dirs: Iterable[Path], read_doc) -> dict[Path, str]:
    """`what_differs` of stage directories, grouped by experiment (their parent directory);
    `read_doc(dir)` gives a directory's spec.yaml document (None to leave it out)."""
    items = []
    for d in dirs:
        doc = read_doc(d)
        if doc is not None:
            items.append((Path(d), doc["stage"], doc["spec"], Path(d).resolve().parent))
    return what_differs(items)
