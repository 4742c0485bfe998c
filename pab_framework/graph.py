"""The stage graph: topological order of `after:` and the content key of every stage."""
from __future__ import annotations

from .keys import ARTIFACT_FORMAT, stage_material
from .spec import ExperimentSpec, digest


def find_cycle(deps: dict[str, list[str]]) -> list[str] | None:
    """A cycle in the dependency graph as a list of ids, or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = {n: WHITE for n in deps}
    stack_path: list[str] = []

    def visit(n: str) -> list[str] | None:
        color[n] = GREY
        stack_path.append(n)
        for d in deps.get(n, []):
            if d not in color:
                continue
            if color[d] == GREY:
                return stack_path[stack_path.index(d):]
            if color[d] == WHITE:
                c = visit(d)
                if c:
                    return c
        stack_path.pop()
        color[n] = BLACK
        return None

    for n in deps:
        if color[n] == WHITE:
            c = visit(n)
            if c:
                return c
    return None


def topological_order(deps: dict[str, list[str]]) -> list[str]:
    """Stable topological order: among ready stages, the order they are written in the spec."""
    order: list[str] = []
    done: set[str] = set()
    pending = list(deps)
    while pending:
        for n in pending:
            if all(d in done for d in deps[n]):
                order.append(n)
                done.add(n)
                pending.remove(n)
                break
        else:  # pragma: no cover - the spec validator rejects cycles first
            raise ValueError("cycle in stage graph")
    return order


def stage_keys(spec: ExperimentSpec, world_size: int | None = None) -> dict[str, str]:
    """Content key of every stage: what its stage kind declares its result depends on
    (`pab_framework.keys`), the artifact format, and its upstream stages' keys.

    The runtime section (device, output directory, processes) is left out unless a stage kind
    asks for its numerics (AMP, a per-rank batch's global size on `world_size` processes): it says
    where and how a result is computed, not what it is."""
    deps = {sid: st.dependencies() for sid, st in spec.stages.items()}
    keys: dict[str, str] = {}
    for sid in topological_order(deps):
        material = {
            "format": ARTIFACT_FORMAT,
            "depends": stage_material(spec, sid, world_size),
            "upstream": {d: keys[d] for d in spec.stages[sid].dependencies()},
        }
        keys[sid] = digest(material)
    return keys
