"""Plain graph algorithms on a dependency mapping (node -> the nodes it depends on)."""
from __future__ import annotations


def find_cycle(deps: dict[str, list[str]]) -> list[str] | None:
    """A cycle in the dependency graph as a list of ids, or None. Dependencies that are not
    nodes of the graph are ignored."""
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
    """Stable topological order: among the ready nodes, the order they are given in."""
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
            raise ValueError("cycle in the dependency graph")
    return order
