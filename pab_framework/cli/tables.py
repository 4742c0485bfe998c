"""The tables the commands print: an experiment's stages, a grid's plan, a grid's results (and
their mean ± std over seeds)."""
from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ..formatting import as_written, fixed, human_bytes
from .output import err, out, rel


def stage_table(title: str, rows, time_col: str = "time (s)", sizes: dict | None = None, differs: dict | None = None) -> Table:
    """One row per stage: (stage, kind, status, result.json, seconds or None, directory). After a
    run, `time (s)` is what this command spent: `-` for a stage reused (computed earlier). With
    `sizes` (directory -> (model.pt bytes, packed bytes)), a column of the network's file sizes;
    with `differs` (directory -> text), a column of what tells stages of one id apart, when any does."""
    differs = differs if differs and any(differs.values()) else None
    table = Table(title=title)
    cols = ("stage", "kind", "status", "density", "val_acc", time_col, *(("what differs",) if differs else ()),
            *(("model.pt / packed",) if sizes is not None else ()), "directory")
    for col in cols:
        table.add_column(col, overflow="fold")
    for sid, kind, status, r, secs, d in rows:
        size = [_sizes(*sizes.get(d, (None, None)))] if sizes is not None else []
        what = [differs.get(d, "") or "-"] if differs else []
        table.add_row(sid, kind, status, fixed(r["density"]) if "density" in r else "-", fixed(r["val_acc"]) if "val_acc" in r else "-",
                      "-" if status == "reused" or secs is None else f"{secs:.1f}", *what, *size, rel(d))
    return table


def _sizes(pt: int | None, packed: int | None) -> str:
    if pt is None:
        return "-"
    return f"{human_bytes(pt)} / {human_bytes(packed) if packed is not None else '-'}"


def print_stages(directory: Path, stages) -> None:
    """An experiment directory's stages, in the order they were started: what each computed, how
    long it took and what its network takes on disk (model.pt, and packed by `pab export`)."""
    from .. import artifacts  # heavy: torch
    from ..differs import stage_labels
    from ..export import file_sizes

    names = sorted({r.experiment for r in stages})
    rows = [(r.stage_id, r.kind, r.status + (", resumed" if (r.result or {}).get("resumed") else ""), r.result or {},
             (r.result or {}).get("compute_s", (r.result or {}).get("wall_s")), r.dir) for r in stages]
    sizes = {r.dir: file_sizes(r.dir) for r in stages if r.status == "complete"}
    differs = stage_labels([r.dir for r in stages], artifacts.read_stage_doc)
    out.print(stage_table(f"{', '.join(names)}: stages", rows, time_col="compute (s)", sizes=sizes, differs=differs))
    counts = {k: sum(r.status == k for r in stages) for k in ("complete", "interrupted", "incomplete")}
    out.print(", ".join(f"{n} {k}" for k, n in counts.items() if n)
              + ("; an interrupted stage resumes from its checkpoint when its spec runs again" if counts["interrupted"] else ""))


def print_contents(directory: Path, found) -> None:
    """What an output directory holds (`listing.output_contents`): one row per experiment or grid."""
    counts = [(sum(e.kind == k for e in found), k) for k in ("experiment", "grid")]
    table = Table(title=f"{rel(directory)}: " + ", ".join(f"{n} {k}{'s' if n != 1 else ''}" for n, k in counts if n))
    for col in ("name", "kind", "stages / runs", "complete / ok", "directory"):
        table.add_column(col, overflow="fold", justify="right" if "/" in col else "left")
    for e in found:
        table.add_row(e.name, e.kind, str(e.count), str(e.done) + (f" ({e.note})" if e.note else ""), rel(e.dir))
    out.print(table)
    out.print(f"`pab results {rel(directory)}/NAME` shows one of them; `pab report {rel(directory)}/NAME` draws it", markup=False)


def _plan_cell(sp) -> str:
    """A run's stage in the plan: its directory, and whether it is done and how many runs share it."""
    notes = (["done"] if sp.complete else []) + ([f"shared x{len(sp.shared_by)}"] if len(sp.shared_by) > 1 else [])
    return sp.dir.name + (f" ({', '.join(notes)})" if notes else "")


def wrap_tokens(prefix: str, tokens: list[str], width: int, sep: str = "  ") -> list[str]:
    """`prefix` then `tokens` on as many lines as `width` needs, each token whole (a directory name
    is never broken); continuation lines are indented to the prefix (or by 4 when it is wide)."""
    indent = " " * (len(prefix) if len(prefix) <= width // 2 else 4)
    lines, line = [], prefix if len(prefix) <= width // 2 else None
    if line is None:
        lines.append(prefix.rstrip())
        line = indent
    fresh = True
    for t in tokens:
        if not fresh and len(line) + len(sep) + len(t) > width:
            lines.append(line.rstrip())
            line, fresh = indent, True
        line += ("" if fresh else sep) + t
        fresh = False
    lines.append(line.rstrip())
    return lines


def print_plan(g, plans, summary: list[dict]) -> None:
    """A grid's dry run: one entry per run (its varied values, then each stage's directory, done or
    not, shared by how many runs), wrapped to the terminal without breaking a name; then per
    stage, how many distinct directories the runs use (`summary`: grid.plan_summary)."""
    from ..grid import short_names  # heavy: the grid package imports torch

    keys = g.varied_keys
    width = max(60, out.width or 120)
    heads = ["run", *short_names(keys)]
    cells = [[str(run.index), *[as_written(run.varied[k]) for k in keys]] for run in g.runs]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]

    def cols(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if i == 0 else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths))) + "  "

    out.print(f"grid {g.name}: {len(g.runs)} runs of {rel(g.base)} (dry run)", markup=False)
    out.print("each stage: its directory; (done) when complete, (shared xN) when N runs use it; computed once either way", markup=False)
    out.print(cols(heads) + "stages", markup=False)
    for run, row in zip(g.runs, cells):
        for line in wrap_tokens(cols(row), [_plan_cell(sp) for sp in plans[run.index]], width):
            out.print(line, markup=False)
    out.print("")
    for s in summary:
        out.print(f"  {s['stage']}: {s['distinct']} distinct directories for {s['runs']} runs ({s['complete']} complete, "
                  f"{s['distinct'] - s['complete']} to compute)", markup=False)
    out.print(f"  stages go under {rel(g.runs[0].spec.output_root)}", markup=False)
    out.print(f"  results go to {rel(g.dir)}", markup=False)


def _results_table(res: dict, heads: list[str]) -> Table:
    keys = res["varied"]
    with_set = "".join(f" --set {o}" for o in res.get("overrides") or [])
    table = Table(title=f"grid {res['grid']}{with_set}: results")
    table.add_column("run", justify="right")
    for h in heads:
        table.add_column(h)
    for col in ("status", "val_acc", "density", "compute (s)", "stages ran/reused"):
        table.add_column(col, justify="right" if col != "status" else "left")
    for r in res["rows"]:
        style = {"ok": "green", "interrupted": "yellow"}.get(r["status"], "red")
        status = f"[{style}]{r['status']}[/]"
        stages = f"{r['stages_ran']}/{r['stages_reused']}" + (f", {r['stages_resumed']} resumed" if r.get("stages_resumed") else "")
        table.add_row(str(r["run"]), *[as_written(r.get(k)) for k in keys], status, fixed(r["val_acc"]) if r.get("val_acc") is not None else "-",
                      fixed(r["density"]) if r.get("density") is not None else "-",
                      "-" if r.get("time_s") is None else f"{r['time_s']:.2f}", stages)
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
            err.print(f"run {r['run']} {'interrupted' if r['status'] == 'interrupted' else 'failed'}: {r.get('error')}", markup=False)
    s = res["summary"]
    cut = f", {s['interrupted']} interrupted" if s.get("interrupted") else ""
    resumed = f"{s['stages_resumed']} resumed, " if s.get("stages_resumed") else ""
    out.print(f"{s['runs']} of {res.get('runs_total', s['runs'])} runs: {s['ok']} ok, {s['failed']} failed{cut}; "
              f"stages: {s['stages_ran']} ran, {resumed}{s['stages_reused']} reused")
    out.print(f"results: {rel(Path(where) / 'results.csv')}, {rel(Path(where) / 'results.json')}")
