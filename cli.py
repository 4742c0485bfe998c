"""`pab`: the command line. It parses and prints; the work is pab_framework's."""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Peek-a-Boo experiments: prune at initialisation, then train only the signs of the surviving weights.")
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)

DebugOpt = typer.Option(False, "--debug", help="Show tracebacks.")
SetOpt = typer.Option(None, "--set", "-s", help="Override a spec value: key.path=value (YAML syntax). Repeatable.")


def _fail(e: BaseException, debug: bool) -> None:
    from pab_framework.errors import PabError

    if debug or os.environ.get("PAB_DEBUG"):
        traceback.print_exception(e)
    if isinstance(e, PabError):
        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else None
        err.print("error: " + (f"[rank {rank}] " if rank is not None else "") + str(e), markup=False)
        raise typer.Exit(e.exit_code)
    raise e


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


@app.command()
def run(
    spec: Path = typer.Argument(..., help="The experiment spec (YAML)."),
    set_: Optional[List[str]] = SetOpt,
    force: bool = typer.Option(False, "--force", help="Recompute every stage, even complete ones."),
    restart: bool = typer.Option(False, "--restart", help="Throw away the checkpoints of incomplete stages instead of resuming from them."),
    progress: Optional[str] = typer.Option(None, "--progress", help="auto, rich, plain or none (default: the spec's runtime.progress)."),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, max=1024,
                                        help="Processes on this node, started through torch's elastic launcher (default: runtime.nproc_per_node)."),
    debug: bool = DebugOpt,
):
    """Run every stage of SPEC (complete stages are reused; interrupted ones resume from their checkpoint).

    With --nproc N (or runtime.nproc_per_node: N) the run is N processes under DistributedDataParallel,
    started through torch's elastic launcher; `torchrun ... -m pab_framework run SPEC` works alike.

    Exit codes: 0 done; 2 bad input (spec, artifact, plugin); 3 stopped by SIGTERM/SIGINT after
    writing a checkpoint (run again to resume); 4 a write failed (full disk), earlier files intact.
    Under several processes the job's code is the failing rank's."""
    from pab_framework import distributed
    from pab_framework.errors import PabError
    from pab_framework.pipeline import run_spec
    from pab_framework.progress import Reporter
    from pab_framework.spec import load_spec

    try:
        s = load_spec(spec, set_ or [])  # a bad spec ends here, before any process starts
        n = nproc or s.runtime.nproc_per_node
        if n > 1 and not distributed.under_launcher():
            distributed.check(s, distributed.DistInfo(world_size=n, local_world_size=n), distributed.pick_device(s.runtime, distributed.DistInfo()))
            argv = ["run", str(spec), *[a for o in set_ or [] for a in ("--set", o)], *(["--force"] if force else []),
                    *(["--restart"] if restart else []), *(["--progress", progress] if progress else []), *(["--debug"] if debug else [])]
            code = distributed.launch(argv, n, debug=debug, log=lambda m: err.print("error: " + m if "failed" in m else m, markup=False))
            raise typer.Exit(code)
        dist = distributed.from_env()
        with distributed.session(s.runtime, dist):
            reporter = Reporter(out, mode=progress or s.runtime.progress, enabled=dist.is_main)
            outcomes = run_spec(s, force=force, restart=restart, reporter=reporter, dist=dist)
    except PabError as e:
        _fail(e, debug)
        return
    except RuntimeError as e:  # under DDP: a peer that failed first leaves the others a bare socket error
        if debug or not distributed.under_launcher() or not distributed.lost_peer(e):
            raise
        err.print(f"error: [rank {os.environ.get('RANK')}] another rank stopped ({str(e).splitlines()[0][:160]})", markup=False)
        raise typer.Exit(1)
    if not dist.is_main:
        return
    table = Table(title=f"{s.name}: results")
    for col in ("stage", "kind", "status", "density", "val_acc", "time (s)", "directory"):
        table.add_column(col, overflow="fold")
    for o in outcomes:
        r = o.result
        table.add_row(o.stage_id, o.kind, "reused" if o.reused else "ran", _fmt(r.get("density", "")),
                      _fmt(r["val_acc"]) if "val_acc" in r else "-", f"{(o.wall_s if not o.reused else r.get('wall_s', 0.0)):.1f}", _rel(o.dir))
    out.print(table)


@app.command()
def validate(spec: Path = typer.Argument(..., help="The experiment spec (YAML)."), set_: Optional[List[str]] = SetOpt, debug: bool = DebugOpt):
    """Check SPEC (or a grid file, every run of it) without running it: exit 0 when valid, 2 with the problems otherwise."""
    from pab_framework import grid as G
    from pab_framework.errors import PabError
    from pab_framework.pipeline import plan
    from pab_framework.spec import load_spec

    try:
        if G.looks_like_grid(spec):  # a grid file: validate every run it expands to
            g = G.load_grid(spec, set_ or [])
            out.print(f"{spec}: a valid grid ({len(g.runs)} runs of {_rel(g.base)}); `pab grid {spec} --dry-run` shows the runs and the stages they share")
            return
        s = load_spec(spec, set_ or [])
    except PabError as e:
        _fail(e, debug)
        return
    out.print(f"{spec}: valid ({len(s.stages)} stages)")
    for sid, key, d, complete in plan(s):
        out.print(f"  {sid:<12} {s.stages[sid].kind:<10} {'complete' if complete else 'to run':<9} {_rel(d)}")


@app.command()
def schema(debug: bool = DebugOpt):
    """Print the JSON Schema of specs, with every installed plugin's parameters."""
    from pab_framework.schema import spec_schema

    sys.stdout.write(json.dumps(spec_schema(), indent=2) + "\n")


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run directory (runs/<name>/), one stage directory, or a grid directory."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Where report.html and the PNGs go (default: RUN_DIR)."),
    debug: bool = DebugOpt,
):
    """Write RUN_DIR/report.html (figures embedded) and its PNGs: curves, flips, per-layer sparsity, FLOPs."""
    from pab_framework.errors import PabError
    from pab_framework.report import build_report

    try:
        r = build_report(run_dir, out_dir)
    except PabError as e:
        _fail(e, debug)
        return
    out.print(f"wrote {_rel(r.html)} ({len(r.sections)} sections, {len(r.pngs)} figures)")


@app.command()
def plugins(debug: bool = DebugOpt):
    """List the installed plugins of every kind, and any that are broken."""
    from pab_framework.registry import GROUPS, registry

    reg = registry()
    table = Table(title="pab plugins")
    for col in ("kind", "name", "from", "status"):
        table.add_column(col, overflow="fold")
    for kind, group in GROUPS.items():
        for name, e in sorted(reg.entries(group).items()):
            doc = (e.obj.__doc__ or "").strip().splitlines()
            table.add_row(kind, name, e.target, "ok" + (f": {doc[0]}" if doc else ""))
        for name, b in sorted(reg.broken(group).items()):
            table.add_row(kind, name, b.target, f"[red]broken[/]: {b.error}")
    out.print(table)


@app.command()
def grid(
    grid_file: Path = typer.Argument(..., metavar="GRID", help="The grid file (YAML): base spec, grid:, zip:, set:, slurm:."),
    executor: str = typer.Option("local", "--executor", "-e", help="local (this machine) or slurm (through submitit)."),
    workers: int = typer.Option(1, "--workers", "-w", min=1, help="local: runs at once, each in its own process."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the runs and the stages they share; run nothing."),
    force: bool = typer.Option(False, "--force", help="Recompute every stage of every run."),
    set_: Optional[List[str]] = SetOpt,
    partition: Optional[str] = typer.Option(None, "--partition", help="slurm: partition (default: the grid's slurm: section)."),
    time_: Optional[str] = typer.Option(None, "--time", help="slurm: time limit per run, minutes or [D-]HH:MM:SS."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="slurm: GPUs per run."),
    cpus: Optional[int] = typer.Option(None, "--cpus", help="slurm: CPUs per run."),
    cluster: str = typer.Option("slurm", "--cluster", help="slurm executor backend: slurm, or submitit's local/debug executors (to try the path here)."),
    no_wait: bool = typer.Option(False, "--no-wait", help="slurm: submit and return; run the grid again later to collect the table."),
    debug: bool = DebugOpt,
):
    """Run every combination of GRID; stages shared between runs are computed once."""
    from pab_framework import grid as G
    from pab_framework.errors import PabError
    from pab_framework.progress import Reporter

    try:
        g = G.load_grid(grid_file, set_ or [])
        for k, v in (("partition", partition), ("time", time_), ("gpus_per_node", gpus), ("cpus_per_task", cpus)):
            if v is not None:
                setattr(g.slurm, k, int(v) if k == "time" and str(v).isdigit() else v)
        if dry_run:
            _print_plan(g, G.plan_grid(g))
            if executor == "slurm":
                out.print(f"\n[bold]sbatch script[/] (not submitted; job folder {_rel(G.slurm_folder(g))}):")
                out.print(G.sbatch_script(g), markup=False)
            return
        reporter = Reporter(out, mode="plain" if not sys.stdout.isatty() else "auto")
        n = len(g.runs)
        out.print(f"grid {g.name}: {n} runs of {_rel(g.base)}, executor {executor}" + (f", {workers} workers" if executor == "local" else ""))

        def on_record(run, rec):
            what = f"val_acc {rec['val_acc']:.4f}" if rec.get("val_acc") is not None else ""
            if rec["status"] != "ok":
                what = (rec.get("error") or "").splitlines()[0][:200]
            ran = sum(1 for s in rec.get("stages", []) if not s["reused"])
            style = "green" if rec["status"] == "ok" else "red"
            reporter.log(f"run {run.index}/{n} [{style}]{rec['status']}[/] ({run.label()}) {what}  stages ran {ran}, reused {len(rec.get('stages', [])) - ran}")

        res = G.run_grid(g, executor=executor, workers=workers, force=force, on_record=on_record, cluster=cluster, wait=not no_wait)
    except PabError as e:
        _fail(e, debug)
        return
    if res.submitted and no_wait:
        out.print(f"submitted {len(res.submitted)} jobs ({', '.join(res.submitted[:4])}{'...' if len(res.submitted) > 4 else ''}); logs in {_rel(G.slurm_folder(g))}")
        return
    _print_results(res.results, g.dir)
    if res.failed:
        raise typer.Exit(1)


@app.command()
def results(directory: Path = typer.Argument(..., metavar="DIR", help="A grid directory (<output_dir>/<grid name>/) or its results.json."), debug: bool = DebugOpt):
    """Print a grid's results table again, from its results.json."""
    from pab_framework.errors import PabError
    from pab_framework.grid import load_results

    try:
        res = load_results(directory)
    except PabError as e:
        _fail(e, debug)
        return
    _print_results(res, directory if directory.is_dir() else directory.parent)


def _cell(v) -> str:
    """A varied value as written in a grid (0.001, 1e-06, synflow, [80,120])."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _print_plan(g, plans) -> None:
    from pab_framework.grid import plan_summary, short_names

    keys = g.varied_keys
    stage_ids = list(dict.fromkeys(sp.stage_id for rows in plans.values() for sp in rows))  # variants may differ in stages
    table = Table(title=f"grid {g.name}: {len(g.runs)} runs of {_rel(g.base)} (dry run)")
    table.add_column("run", justify="right")
    for s in short_names(keys):
        table.add_column(s)
    for sid in stage_ids:
        table.add_column(sid, overflow="fold")
    for run in g.runs:
        by_id = {sp.stage_id: sp for sp in plans[run.index]}
        cells = []
        for sid in stage_ids:
            sp = by_id.get(sid)
            if sp is None:
                cells.append("-")
                continue
            note = "done" if sp.complete else "to run"
            if len(sp.shared_by) > 1:
                note += f", shared x{len(sp.shared_by)}"
            cells.append(f"{sp.dir.name} ({note})")
        table.add_row(str(run.index), *[_cell(run.varied[k]) for k in keys], *cells)
    out.print(table)
    for s in plan_summary(plans):
        out.print(f"  {s['stage']}: {s['distinct']} distinct directories for {s['runs']} runs ({s['complete']} complete, {s['distinct'] - s['complete']} to compute)")
    out.print(f"  stages go under {_rel(g.runs[0].spec.output_root)}; results to {_rel(g.dir)}")


def _print_results(res: dict, where: Path) -> None:
    from pab_framework.grid import short_names

    keys = res["varied"]
    heads = short_names(keys)
    table = Table(title=f"grid {res['grid']}: results")
    table.add_column("run", justify="right")
    for h in heads:
        table.add_column(h)
    for col in ("status", "val_acc", "density", "time (s)", "stages ran/reused"):
        table.add_column(col, justify="right" if col != "status" else "left")
    for r in res["rows"]:
        status = "[green]ok[/]" if r["status"] == "ok" else f"[red]{r['status']}[/]"
        table.add_row(str(r["run"]), *[_cell(r.get(k)) for k in keys], status, _fmt(r["val_acc"]) if r.get("val_acc") is not None else "-",
                      _fmt(r["density"]) if r.get("density") is not None else "-",
                      "-" if r.get("time_s") is None else f"{r['time_s']:.2f}", f"{r['stages_ran']}/{r['stages_reused']}")
    out.print(table)
    if res.get("over_seeds"):
        others = [k for k in keys if k != "seed"]
        t2 = Table(title="mean ± std over seeds")
        for h in short_names(others):
            t2.add_column(h)
        for col in ("seeds ok", "val_acc", "density"):
            t2.add_column(col, justify="right")
        for r in res["over_seeds"]:
            def ms(m):
                return "-" if r[f"{m}_mean"] is None else f"{r[f'{m}_mean']:.4f} ± {r[f'{m}_std']:.4f}"
            t2.add_row(*[_cell(r.get(k)) for k in others], f"{r['ok']}/{r['seeds']}", ms("val_acc"), ms("density"))
        out.print(t2)
    for r in res["rows"]:
        if r["status"] != "ok":
            err.print(f"run {r['run']} failed: {r.get('error')}", markup=False)
    s = res["summary"]
    out.print(f"{s['runs']} of {res.get('runs_total', s['runs'])} runs: {s['ok']} ok, {s['failed']} failed; stages: {s['stages_ran']} ran, {s['stages_reused']} reused")
    out.print(f"results: {_rel(Path(where) / 'results.csv')}, {_rel(Path(where) / 'results.json')}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
