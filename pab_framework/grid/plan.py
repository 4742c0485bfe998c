"""The plan of a grid: which stage directories each run uses, which are complete, which are shared."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..datacheck import problems
from ..errors import Problem
from ..pipeline import plan, to_run
from .gridfile import Grid, GridError, Run


@dataclass
class StagePlan:
    stage_id: str
    kind: str
    key: str
    dir: Path
    complete: bool
    shared_by: list[int]  # run indices using this directory


def plan_grid(grid: Grid) -> dict[int, list[StagePlan]]:
    """For every run, its stages in order: directory, completeness, and which runs share it."""
    users: dict[Path, list[int]] = {}
    per_run = {run.index: plan(run.spec) for run in grid.runs}
    for run in grid.runs:
        for step in per_run[run.index]:
            users.setdefault(step.dir, []).append(run.index)
    return {
        run.index: [StagePlan(s.stage_id, run.spec.stages[s.stage_id].kind, s.key, s.dir, s.complete, users[s.dir]) for s in per_run[run.index]]
        for run in grid.runs
    }


def check_runs_data(grid: Grid, plans: dict[int, list[StagePlan]], force: bool = False) -> None:
    """The data every run's stages to compute will read is there (pab_framework.datacheck); one
    GridError naming each problem and the runs it stops, before any run starts."""
    found: dict[str, list[int]] = {}
    for run in grid.runs:
        for p in problems(run.spec, to_run(plans[run.index], force), name_stages=False):
            found.setdefault(p.render(), []).append(run.index)
    if found:
        def runs(r: list[int]) -> str:
            if len(r) == len(grid.runs) > 1:
                return f"all {len(r)} runs"
            return f"run{'s' if len(r) > 1 else ''} {', '.join(map(str, r[:8]))}{'...' if len(r) > 8 else ''}"

        raise GridError([Problem((), f"{msg} ({runs(r)})") for msg, r in found.items()], title="missing data")


def plan_summary(plans: dict[int, list[StagePlan]]) -> list[dict]:
    """Per stage id: how many runs, how many distinct directories, how many already complete."""
    out: dict[str, dict] = {}
    for rows in plans.values():
        for sp in rows:
            s = out.setdefault(sp.stage_id, {"stage": sp.stage_id, "runs": 0, "dirs": set(), "complete": set()})
            s["runs"] += 1
            s["dirs"].add(sp.dir)
            if sp.complete:
                s["complete"].add(sp.dir)
    return [{"stage": s["stage"], "runs": s["runs"], "distinct": len(s["dirs"]), "complete": len(s["complete"])} for s in out.values()]


def schedule(todo: list[Run], plans: dict[int, list[StagePlan]]) -> list[Run]:
    """Runs whose stages nobody before them computes go first: shared stages are then computed
    in parallel, not waited on by the runs that reuse them."""
    counts: dict[Path, int] = {}
    ranked = []
    for run in todo:
        rank = max((counts.get(sp.dir, 0) for sp in plans[run.index] if not sp.complete), default=0)
        for sp in plans[run.index]:
            counts[sp.dir] = counts.get(sp.dir, 0) + 1
        ranked.append((rank, run.index, run))
    return [r for _, _, r in sorted(ranked, key=lambda t: (t[0], t[1]))]
