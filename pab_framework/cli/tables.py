"""The tables the commands print: an experiment's stages, a grid's plan, a grid's results (and
their mean ± std over seeds)."""
from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ..formatting import as_written, fixed, human_bytes
from .output import err, out, rel


def stage_table(title: str, rows, time_col: str = "time (s)", sizes: dict | None = None) -> Table:
    """One row per stage: (stage, kind, status, result.json, seconds or None, directory). After a
    run, `time (s)` is what this command spent: `-` for a stage reused (computed earlier). With
    `sizes` (directory -> (model.pt bytes, packed bytes)), a column of the network's file sizes."""
    table = Table(title=title)
    cols = ("stage", "kind", "status", "density", "val_acc", time_col, *(("model.pt / packed",) if sizes is not None else ()), "directory")
    for col in cols:
        table.add_column(col, overflow="fold")
    for sid, kind, status, r, secs, d in rows:
        size = [_sizes(*sizes.get(d, (None, None)))] if sizes is not None else []
        table.add_row(sid, kind, status, fixed(r["density"]) if "density" in r else "-", fixed(r["val_acc"]) if "val_acc" in r else "-",
                      "-" if status == "reused" or secs is None else f"{secs:.1f}", *size, rel(d))
    return table


def _sizes(pt: int | None, packed: int | None) -> str:
    if pt is None:
        return "-"
    return f"{human_bytes(pt)} / {human_bytes(packed) if packed is not None else '-'}"


def print_stages(directory: Path, stages) -> None:
    """An experiment directory's stages, in the order they were started: what each computed, how
    long it took and what its network takes on disk (model.pt, and packed by `pab export`)."""
    from ..export import file_sizes  # heavy: torch

    names = sorted({r.experiment for r in stages})
    rows = [(r.stage_id, r.kind, r.status + (", resumed" if (r.result or {}).get("resumed") else ""), r.result or {},
             (r.result or {}).get("compute_s", (r.result or {}).get("wall_s")), r.dir) for r in stages]
    sizes = {r.dir: file_sizes(r.dir) for r in stages if r.status == "complete"}
    out.print(stage_table(f"{', '.join(names)}: stages", rows, time_col="compute (s)", sizes=sizes))
    counts = {k: sum(r.status == k for r in stages) for k in ("complete", "interrupted", "incomplete")}
    out.print(", ".join(f"{n} {k}" for k, n in counts.items() if n)
              + ("; an interrupted stage resumes from its checkpoint when its spec runs again" if counts["interrupted"] else ""))


def _plan_cell(sp) -> str:
    """A run's stage in the plan: its directory, done or to run, and how many runs share it."""
    if sp is None:
        return "-"
    note = "done" if sp.complete else "to run"
    if len(sp.shared_by) > 1:
        note += f", shared x{len(sp.shared_by)}"
    return f"{sp.dir.name} ({note})"


def print_plan(g, plans, summary: list[dict]) -> None:
    """A grid's dry run: per run, its varied values and each stage's directory; then per stage,
    how many distinct directories the runs use (`summary`: grid.plan_summary)."""
    from ..grid import short_names  # heavy: the grid package imports torch

    keys = g.varied_keys
    stage_ids = list(dict.fromkeys(sp.stage_id for rows in plans.values() for sp in rows))  # variants may differ in stages
    table = Table(title=f"grid {g.name}: {len(g.runs)} runs of {rel(g.base)} (dry run)")
    table.add_column("run", justify="right")
    for s in short_names(keys):
        table.add_column(s)
    for sid in stage_ids:
        table.add_column(sid, overflow="fold")
    for run in g.runs:
        by_id = {sp.stage_id: sp for sp in plans[run.index]}
        table.add_row(str(run.index), *[as_written(run.varied[k]) for k in keys], *[_plan_cell(by_id.get(sid)) for sid in stage_ids])
    out.print(table)
    for s in summary:
        out.print(f"  {s['stage']}: {s['distinct']} distinct directories for {s['runs']} runs ({s['complete']} complete, {s['distinct'] - s['complete']} to compute)")
    out.print(f"  stages go under {rel(g.runs[0].spec.output_root)}; results to {rel(g.dir)}")


def _results_table(res: dict, heads: list[str]) -> Table:
    keys = res["varied"]
    table = Table(title=f"grid {res['grid']}: results")
    table.add_column("run", justify="right")
    for h in heads:
        table.add_column(h)
    for col in ("status", "val_acc", "density", "compute (s)", "stages ran/reused"):
        table.add_column(col, justify="right" if col != "status" else "left")
    for r in res["rows"]:
        status = "[green]ok[/]" if r["status"] == "ok" else f"[red]{r['status']}[/]"
        table.add_row(str(r["run"]), *[as_written(r.get(k)) for k in keys], status, fixed(r["val_acc"]) if r.get("val_acc") is not None else "-",
                      fixed(r["density"]) if r.get("density") is not None else "-",
                      "-" if r.get("time_s") is None else f"{r['time_s']:.2f}", f"{r['stages_ran']}/{r['stages_reused']}")
    return table


def _seeds_table(res: dict, heads: list[str]) -> Table:
    others = [k for k in res["varied"] if k != "seed"]
    table = Table(title="mean ± std over seeds")
    for h in heads:
        table.add_column(h)
    for col in ("seeds ok", "val_acc", "density"):
        table.add_column(col, justify="right")
    for r in res["over_seeds"]:
        def ms(m):
            return "-" if r[f"{m}_mean"] is None else f"{r[f'{m}_mean']:.4f} ± {r[f'{m}_std']:.4f}"
        table.add_row(*[as_written(r.get(k)) for k in others], f"{r['ok']}/{r['seeds']}", ms("val_acc"), ms("density"))
    return table


def print_results(res: dict, where: Path) -> None:
    """A grid's results (what results.json holds): the table, the statistics over seeds, the
    failed runs' errors, the totals, and where the files are."""
    from ..grid import short_names  # heavy: the grid package imports torch

    out.print(_results_table(res, short_names(res["varied"])))
    if res.get("over_seeds"):
        out.print(_seeds_table(res, short_names([k for k in res["varied"] if k != "seed"])))
    for r in res["rows"]:
        if r["status"] != "ok":
            err.print(f"run {r['run']} failed: {r.get('error')}", markup=False)
    s = res["summary"]
    out.print(f"{s['runs']} of {res.get('runs_total', s['runs'])} runs: {s['ok']} ok, {s['failed']} failed; stages: {s['stages_ran']} ran, {s['stages_reused']} reused")
    out.print(f"results: {rel(Path(where) / 'results.csv')}, {rel(Path(where) / 'results.json')}")
