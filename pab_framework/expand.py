"""Spec shorthands, expanded before validation: variables and repeated stage blocks.

**Variables.** A spec's top-level `vars:` names values; a value written as exactly `${name}`
anywhere else in the spec is replaced by it (the whole value: a number stays a number). A grid can
vary `vars.density`, and every stage that refers to `${density}` follows; a stage that does not
keeps its key, so it is shared between the runs.

**Repeated blocks.** An entry of `stages:` with `repeat: R` instead of `kind:` is a block of
stages run R times in sequence (iterative magnitude pruning: train, prune, rewind, train, ...):

    imp:
      repeat: 3
      start: {train: dense}          # round 1's `train@previous` is the stage `dense`
      stages:
        prune: {kind: prune, after: [train@previous], pruner: {name: magnitude, density: 0.512, round: "${round}", rounds: "${rounds}"}}
        train: {kind: train, after: [prune], weights_from: {stage: dense, epoch: 1}, epochs: 4}

Round r's copy of the inner stage `X` is the stage `X_r<r>` (prune_r1, train_r1, prune_r2, ...).
Inside the block, a stage reference (in `after:`, `masks_from`, `weights_from`) to an inner stage
`X` means this round's, `X@previous` the previous round's (in round 1: `start[X]`), and any
other name a stage outside the block. `${round}` (1..R) and `${rounds}` (R) are variables of the
block.
"""
from __future__ import annotations

import copy
import re
from typing import Any

VAR = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
BLOCK_KEYS = ("repeat", "start", "stages")
RESERVED_VARS = ("round", "rounds")
MAX_ROUNDS = 1000


def _substitute(obj: Any, values: dict, path: tuple, problems: list, skip_top: bool = False) -> Any:
    if isinstance(obj, str):
        m = VAR.match(obj.strip())
        if not m:
            return obj
        name = m.group(1)
        if name in values:
            return copy.deepcopy(values[name])
        known = ", ".join(sorted(k for k in values if k not in RESERVED_VARS)) or "none defined"
        problems.append((path, f"{obj} names no variable (vars: {known})"))
        return obj
    if isinstance(obj, dict):
        return {k: (v if skip_top and k == "vars" else _substitute(v, values, path + (k,), problems)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_substitute(v, values, path + (i,), problems) for i, v in enumerate(obj)]
    return obj


def _is_block(v: Any) -> bool:
    return isinstance(v, dict) and "repeat" in v and "kind" not in v


def _ref(ref: Any, inner: set[str], rnd: int, start: dict, problems: list, path: tuple) -> Any:
    """A stage reference inside round `rnd` of a block, as the expanded stage id."""
    if not isinstance(ref, str):
        return ref
    if ref.endswith("@previous"):
        x = ref[: -len("@previous")]
        if x not in inner:
            problems.append((path, f"{ref!r}: {x!r} is not a stage of this block ({', '.join(sorted(inner))})"))
            return ref
        if rnd > 1:
            return f"{x}_r{rnd - 1}"
        if x not in start:
            problems.append((path, f"{ref!r} in round 1 needs `start: {{{x}: <a stage>}}`: the stage that stands for it before the first round"))
            return ref
        return start[x]
    return f"{ref}_r{rnd}" if ref in inner else ref


def _expand_block(bid: str, block: dict, problems: list, remap: dict) -> dict:
    base = ("stages", bid)
    for k in block:
        if k not in BLOCK_KEYS:
            problems.append((base + (k,), f"unknown key {k!r} in a repeated block; allowed: {', '.join(BLOCK_KEYS)}"))
    rounds, start, inner = block.get("repeat"), block.get("start") or {}, block.get("stages")
    if not isinstance(rounds, int) or isinstance(rounds, bool) or not 1 <= rounds <= MAX_ROUNDS:
        problems.append((base + ("repeat",), f"must be a whole number of rounds from 1 to {MAX_ROUNDS} (got {rounds!r})"))
        return {}
    if not isinstance(start, dict) or not all(isinstance(v, str) for v in start.values()):
        problems.append((base + ("start",), "must map inner stage names to the stages that stand for them before round 1"))
        return {}
    if not isinstance(inner, dict) or not inner:
        problems.append((base + ("stages",), "needs the block's stages (a mapping of stage id to stage)"))
        return {}
    names = set(inner)
    for x in start:
        if x not in names:
            problems.append((base + ("start", x), f"{x!r} is not a stage of this block ({', '.join(sorted(names))})"))
    out: dict = {}
    for rnd in range(1, rounds + 1):
        for x, st in inner.items():
            src = base + ("stages", x)
            st = _substitute(copy.deepcopy(st), {"round": rnd, "rounds": rounds}, src, [])
            if isinstance(st, dict):
                if isinstance(st.get("after"), list):
                    st["after"] = [_ref(a, names, rnd, start, problems, src + ("after", i)) for i, a in enumerate(st["after"])]
                for key in ("masks_from", "weights_from"):
                    v = st.get(key)
                    if isinstance(v, str):
                        st[key] = _ref(v, names, rnd, start, problems, src + (key,))
                    elif isinstance(v, dict) and isinstance(v.get("stage"), str):
                        v["stage"] = _ref(v["stage"], names, rnd, start, problems, src + (key, "stage"))
            sid = f"{x}_r{rnd}"
            out[sid] = st
            remap[("stages", sid)] = src
    return out


def expand(data: Any) -> tuple[Any, dict[tuple, tuple], list[tuple[tuple, str]]]:
    """(expanded data, {expanded path prefix: original path prefix}, problems)."""
    problems: list[tuple[tuple, str]] = []
    remap: dict[tuple, tuple] = {}
    if not isinstance(data, dict):
        return data, remap, problems
    values = data.get("vars", {})
    if values is None:
        values = {}
    if not isinstance(values, dict):
        problems.append((("vars",), "must be a mapping of names to values"))
        values = {}
    for name in values:
        if not isinstance(name, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            problems.append((("vars", name), f"variable name {name!r} must be letters, digits and '_'"))
        elif name in RESERVED_VARS:
            problems.append((("vars", name), f"{name!r} is the round of a repeated block; choose another name"))
    # blocks keep ${round} for their own rounds; every other ${name} is a spec variable
    stages = data.get("stages")
    blocks = {k: v for k, v in stages.items() if _is_block(v)} if isinstance(stages, dict) else {}
    protected = {**values, **{r: "${" + r + "}" for r in RESERVED_VARS}}
    out = _substitute(data, protected, (), problems, skip_top=True)
    if blocks:
        new: dict = {}
        for sid, st in out["stages"].items():
            if sid in blocks:
                got = _expand_block(sid, st, problems, remap)
                for k in got:
                    if k in out["stages"] or k in new:
                        problems.append((("stages", sid), f"round stage {k!r} clashes with a stage of the same id"))
                new.update(got)
            else:
                new[sid] = st
        out["stages"] = new
    for path, name in _round_refs(out, ()):  # ${round} outside a block
        problems.append((original_path(path, remap), f"${{{name}}} is only defined inside a repeated block (repeat:)"))
    return out, remap, problems


def _round_refs(obj: Any, path: tuple):
    if isinstance(obj, str):
        m = VAR.match(obj.strip())
        if m and m.group(1) in RESERVED_VARS:
            yield path, m.group(1)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _round_refs(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _round_refs(v, path + (i,))


def original_path(path: tuple, remap: dict[tuple, tuple]) -> tuple:
    """Where an expanded path stands in the spec as written (for its line number)."""
    for n in range(len(path), 0, -1):
        if path[:n] in remap:
            return remap[path[:n]] + tuple(path[n:])
    return tuple(path)
