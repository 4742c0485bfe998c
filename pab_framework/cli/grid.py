"""`pab grid`: every run of a grid file, here (K at a time) or as a SLURM array; or its plan."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from ..errors import PabError
from ..progress import Reporter
from .output import DebugOpt, SetOpt, fail, out, rel
from .tables import print_plan, print_results


def with_slurm_flags(g, *, partition: str | None, time: str | None, gpus: int | None, cpus: int | None) -> None:
    """The grid's `slurm:` options with the flags given on the command line over them (a time of
    digits alone is minutes)."""
    flags = {"partition": partition, "time": int(time) if time is not None and time.isdigit() else time, "gpus_per_node": gpus, "cpus_per_task": cpus}
    g.slurm = g.slurm.model_copy(update={k: v for k, v in flags.items() if v is not None})


def record_line(run, rec: dict, n: int) -> str:
    """The line a finished run prints: its status, what it reached (or its error), its stages:
    how many it computed, resumed from a checkpoint (named), and reused."""
    from ..grid.results import stage_counts  # heavy: the grid package imports torch

    what = f"val_acc {rec['val_acc']:.4f}" if rec.get("val_acc") is not None else ""
    if rec["status"] != "ok":
        what = escape((rec.get("error") or "").splitlines()[0][:300])
    ran, resumed, reused = stage_counts(rec)
    names = [s["stage"] for s in rec.get("stages", []) if s.get("resumed") and not s["reused"]]
    style = {"ok": "green", "interrupted": "yellow"}.get(rec["status"], "red")
    counts = f"stages ran {ran}, " + (f"resumed {resumed} ({', '.join(names)}), " if resumed else "") + f"reused {reused}"
    return f"run {run.index}/{n} [{style}]{rec['status']}[/] ({escape(run.label())}) {what}" + (f"  {counts}" if rec.get("stages") else "")


def grid(
    grid_file: Path = typer.Argument(..., metavar="GRID", help="The grid file (YAML): base spec, grid:, zip:, set:, slurm:."),
    executor: str = typer.Option("local", "--executor", "-e", metavar="NAME", help="local (this machine) or slurm (through submitit)."),
    workers: int = typer.Option(1, "--workers", "-w", min=1, metavar="K", help="local: runs at once, each in its own process."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the runs and the stages they share; run nothing."),
    force: bool = typer.Option(False, "--force", help="Recompute every stage of every run."),
    set_: Optional[List[str]] = SetOpt,
    partition: Optional[str] = typer.Option(None, "--partition", metavar="NAME", help="slurm: partition (default: the grid's slurm: section)."),
    time_: Optional[str] = typer.Option(None, "--time", metavar="LIMIT", help="slurm: time limit per run, minutes or [D-]HH:MM:SS."),
    gpus: Optional[int] = typer.Option(None, "--gpus", metavar="N", help="slurm: GPUs per run."),
    cpus: Optional[int] = typer.Option(None, "--cpus", metavar="N", help="slurm: CPUs per run."),
    cluster: str = typer.Option("slurm", "--cluster", metavar="NAME", help="slurm executor backend: slurm, or submitit's local/debug executors (to try the path here)."),
    no_wait: bool = typer.Option(False, "--no-wait", help="slurm: submit and return; run the grid again later to collect the table."),
    debug: bool = DebugOpt,
):
    """Run every combination of GRID; stages shared between runs are computed once.

    Exit codes: 0 every run ok; 1 some run failed (the others finished; see the table); 2 bad input
    (grid file, spec, missing data); 3 stopped by SIGINT/SIGTERM: the runs in flight checkpointed
    their train stages, no new run started (run the same command again to resume)."""
    from .. import grid as G  # heavy: torch (the grid runs the pipeline)

    try:
        g = G.load_grid(grid_file, set_ or [])
        with_slurm_flags(g, partition=partition, time=time_, gpus=gpus, cpus=cpus)
        if dry_run:
            plans = G.plan_grid(g)
            print_plan(g, plans, G.plan_summary(plans))
            if executor == "slurm":
                out.print(f"\n[bold]sbatch script[/] (not submitted; job folder {rel(G.slurm_folder(g))}):")
                out.print(G.sbatch_script(g), markup=False)
            return
        reporter = Reporter(out, mode="plain" if not sys.stdout.isatty() else "auto")
        n = len(g.runs)
        out.print(f"grid {g.name}: {n} runs of {rel(g.base)}, executor {executor}" + (f", {workers} workers" if executor == "local" else ""))
        res = G.run_grid(g, executor=executor, workers=workers, force=force, cluster=cluster, wait=not no_wait, overrides=list(set_ or []),
                         on_record=lambda run, rec: reporter.log(record_line(run, rec, n)))
    except PabError as e:
        fail(e, debug)
        return
    if res.submitted and no_wait:
        out.print(f"submitted {len(res.submitted)} jobs ({', '.join(res.submitted[:4])}{'...' if len(res.submitted) > 4 else ''}); logs in {rel(G.slurm_folder(g))}")
        return
    print_results(res.results, g.dir)
    if res.failed:
        raise typer.Exit(1)
