"""The stage graph: topological order of `after:` and the content key of every stage."""
from __future__ import annotations

from .spec import ExperimentSpec, digest

# Bump when the meaning of a stage's artifacts changes, so old caches are not reused.
ARTIFACT_FORMAT = 1


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


def runtime_numerics(spec: ExperimentSpec, world_size: int | None = None) -> dict:
    """The part of `runtime` that changes what a training stage computes: mixed precision, and
    the global batch when `batch_size_is: per_rank` runs on several processes. Empty in the
    default setting (full precision; `global` batches mean the same on any number of processes)."""
    rt = spec.runtime
    w = world_size or rt.nproc_per_node
    out: dict = {}
    if rt.amp != "none":
        out["amp"] = rt.amp
    if rt.batch_size_is == "per_rank" and w > 1:
        out["global_batch_size"] = spec.data.batch_size * w
    return out


def stage_keys(spec: ExperimentSpec, world_size: int | None = None) -> dict[str, str]:
    """Content key of every stage: its own spec, the model, data and seed, and its upstream keys.

    The runtime section (device, output directory, processes) is left out: it says where and how
    a result is computed, not what it is; except, for stage kinds that declare
    `runtime_in_key = True` (train), what `runtime_numerics` returns (AMP, a per-rank
    batch's global size on `world_size` processes), so such runs never reuse each other's results.
    """
    resolved = spec.resolved_dict()
    deps = {sid: list(st.after) for sid, st in spec.stages.items()}
    numerics = runtime_numerics(spec, world_size)
    keys: dict[str, str] = {}
    for sid in topological_order(deps):
        material = {
            "format": ARTIFACT_FORMAT,
            "stage": resolved["stages"][sid],
            "model": resolved["model"],
            "data": resolved["data"],
            "seed": spec.seed,
            "upstream": {d: keys[d] for d in spec.stages[sid].after},
        }
        if numerics and getattr(spec.stages[sid].plugin, "runtime_in_key", False):
            material["runtime"] = numerics
        keys[sid] = digest(material)
    return keys
