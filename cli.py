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
from typer.core import TyperCommand, TyperGroup


def _reflow(text: str | None) -> str | None:
    """A docstring's paragraphs, each on one line: the help wraps them to the terminal."""
    if not text:
        return text
    import inspect

    paras = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paras)


def _plain_flags(params) -> list:
    """A flag takes no value: no `<bool>` beside it in the help (typer's rich help shows one)."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class _Command(TyperCommand):
    """Help that reads as words: `pab run [OPTIONS] SPEC`, flags without a type, paragraphs reflowed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.help = _reflow(self.help)

    def get_params(self, ctx):
        return _plain_flags(super().get_params(ctx))

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if p.param_type_name == "argument":
                word = p.metavar or (p.name or "").upper()
                pieces.append(word if p.required else f"[{word}]")
        return pieces


class _Group(TyperGroup):
    def get_params(self, ctx):
        return _plain_flags(super().get_params(ctx))


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=_Group,
                  help="Peek-a-Boo experiments: prune at initialisation, then train only the signs of the surviving weights.")
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)

DebugOpt = typer.Option(False, "--debug", help="Show tracebacks.")
SetOpt = typer.Option(None, "--set", "-s", metavar="KEY=VALUE", help="Override a spec value: key.path=value (YAML syntax). Repeatable.")
SpecArg = typer.Argument(..., metavar="SPEC", help="The experiment spec (YAML).")


def _version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from pab_framework.distributed import DistInfo, pick_device
    from pab_framework.spec import RuntimeSpec

    try:
        mine = version("pab")
    except PackageNotFoundError:  # run from a source tree that was never installed
        mine = "(not installed)"
    dev = pick_device(RuntimeSpec(), DistInfo())  # what runtime.device: auto picks
    what = f"cuda ({torch.cuda.get_device_name(dev)}, {torch.cuda.device_count()} visible)" if dev.type == "cuda" else "cpu"
    out.print(f"pab {mine}\ntorch {torch.__version__}\ndevice {what} (what runtime.device: auto uses here)", markup=False)
    raise typer.Exit(0)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the pab and torch versions and the device a run would use, and exit.")):
    pass  # the commands do the work; this only holds --version


def _fail(e: BaseException, debug: bool) -> None:
    from pab_framework.checkpoint import Interrupted
    from pab_framework.errors import PabError

    if debug or os.environ.get("PAB_DEBUG"):
        traceback.print_exception(e)
    if isinstance(e, PabError):
        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else None
        label = "stopped" if isinstance(e, Interrupted) else "error"  # a planned stop (exit 3) is not an error
        err.print(f"{label}: " + (f"[rank {rank}] " if rank is not None else "") + str(e), markup=False)
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


@app.command(cls=_Command)
def run(
    spec: Path = SpecArg,
    set_: Optional[List[str]] = SetOpt,
    force: bool = typer.Option(False, "--force", help="Recompute every stage, even complete ones."),
    restart: bool = typer.Option(False, "--restart", help="Throw away the checkpoints of incomplete stages instead of resuming from them."),
    progress: Optional[str] = typer.Option(None, "--progress", metavar="MODE", help="auto, rich, plain or none (default: the spec's runtime.progress)."),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, max=1024, metavar="N",
                                        help="Processes on this node, started through torch's elastic launcher (default: runtime.nproc_per_node)."),
    debug: bool = DebugOpt,
):
    """Run every stage of SPEC (complete stages are reused; interrupted ones resume from their checkpoint).

    With --nproc N (or runtime.nproc_per_node: N) the run is N processes under DistributedDataParallel,
    started through torch's elastic launcher; `torchrun ... -m pab_framework run SPEC` works alike.

    Exit codes: 0 done; 2 bad input (spec, missing data, artifact, plugin) or a non-finite loss; 3 stopped
    by SIGTERM/SIGINT after writing a checkpoint (run again to resume); 4 a write failed (full disk),
    earlier files intact.
    Under several processes the job's code is the failing rank's."""
    from pab_framework import distributed
    from pab_framework.datacheck import check_data
    from pab_framework.errors import PabError
    from pab_framework.pipeline import plan, run_spec
    from pab_framework.progress import Reporter
    from pab_framework.spec import load_spec

    try:
        s = load_spec(spec, set_ or [])  # a bad spec ends here, before any process starts
        n = nproc or s.runtime.nproc_per_node
        if n > 1 and not distributed.under_launcher():
            distributed.check(s, distributed.DistInfo(world_size=n, local_world_size=n), distributed.pick_device(s.runtime, distributed.DistInfo()))
            check_data(s, [sid for sid, _, _, complete in plan(s, n) if force or not complete])  # once, before N processes start
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
    out.print(_stage_table(f"{s.name}: results", [(o.stage_id, o.kind, o.status, o.result, o.wall_s, o.dir) for o in outcomes]))


def _stage_table(title: str, rows, time_col: str = "time (s)") -> Table:
    """One row per stage: (stage, kind, status, result.json, seconds or None, directory). After a
    run, `time (s)` is what this command spent: `-` for a stage reused (computed earlier)."""
    table = Table(title=title)
    for col in ("stage", "kind", "status", "density", "val_acc", time_col, "directory"):
        table.add_column(col, overflow="fold")
    for sid, kind, status, r, secs, d in rows:
        table.add_row(sid, kind, status, _fmt(r["density"]) if "density" in r else "-", _fmt(r["val_acc"]) if "val_acc" in r else "-",
                      "-" if status == "reused" or secs is None else f"{secs:.1f}", _rel(d))
    return table


@app.command(cls=_Command)
def validate(spec: Path = SpecArg, set_: Optional[List[str]] = SetOpt, debug: bool = DebugOpt):
    """Check SPEC (or a grid file, every run of it) without running it: exit 0 when valid, 2 with the problems otherwise."""
    from pab_framework import grid as G
    from pab_framework.datacheck import check_data
    from pab_framework.errors import PabError
    from pab_framework.pipeline import plan
    from pab_framework.spec import load_spec

    try:
        if G.looks_like_grid(spec):  # a grid file: validate every run it expands to
            g = G.load_grid(spec, set_ or [])
            G.check_runs_data(g, G.plan_grid(g))
            out.print(f"{spec}: a valid grid ({len(g.runs)} runs of {_rel(g.base)}); `pab grid {spec} --dry-run` shows the runs and the stages they share")
            return
        s = load_spec(spec, set_ or [])
        steps = plan(s)
        check_data(s, [sid for sid, _, _, complete in steps if not complete])  # a complete stage needs no data
    except PabError as e:
        _fail(e, debug)
        return
    out.print(f"{spec}: valid ({len(s.stages)} stages)")
    for sid, key, d, complete in steps:
        out.print(f"  {sid:<12} {s.stages[sid].kind:<10} {'complete' if complete else 'to run':<9} {_rel(d)}")


@app.command(cls=_Command)
def schema(debug: bool = DebugOpt):
    """Print the JSON Schema of specs, with every installed plugin's parameters."""
    from pab_framework.schema import spec_schema

    sys.stdout.write(json.dumps(spec_schema(), indent=2) + "\n")


@app.command(cls=_Command)
def report(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run directory (runs/<name>/), one stage directory, or a grid directory."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", metavar="DIR", help="Where report.html and the PNGs go (default: RUN_DIR)."),
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


@app.command(cls=_Command)
def plugins(debug: bool = DebugOpt):
    """List the installed plugins of every kind, and any that are broken."""
    from pab_framework.registry import GROUPS, registry

    reg = registry()
    table = Table(title="pab plugins")
    for col in ("kind", "name", "from", "status"):
        table.add_column(col, overflow="fold")
    for kind, group in GROUPS.items():
        for name, e in sorted(reg.entries(group).items()):
            summary = e.summary  # the docstring's first sentence, whole
            table.add_row(kind, name, e.target, "ok" + (f": {summary}" if summary else ""))
        for name, b in sorted(reg.broken(group).items()):
            table.add_row(kind, name, b.target, f"[red]broken[/]: {b.error}")
    out.print(table)


@app.command(cls=_Command)
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


@app.command(cls=_Command)
def results(directory: Path = typer.Argument(..., metavar="DIR", help="An experiment directory (<output_dir>/<name>/), one stage "
                                             "directory, or a grid directory (<output_dir>/<grid name>/) or its results.json."),
            debug: bool = DebugOpt):
    """Print the results table of an experiment (its stages, from their result.json) or of a grid (from its results.json)."""
    from pab_framework import artifacts
    from pab_framework.errors import PabError
    from pab_framework.grid import RESULTS_JSON, load_results

    try:
        if directory.is_dir() and not (directory / RESULTS_JSON).is_file():
            stages = artifacts.experiment_stages(directory)
            if not stages:
                raise PabError(f"{directory}: no stage directories (<stage>-<key>/ with spec.yaml) and no {RESULTS_JSON} here; give an "
                               f"experiment directory (<output_dir>/<name>/), one stage directory, or a grid directory")
            _print_stages(directory, stages)
            return
        res = load_results(directory)
    except PabError as e:
        _fail(e, debug)
        return
    _print_results(res, directory if directory.is_dir() else directory.parent)


def _print_stages(directory: Path, stages) -> None:
    """An experiment directory's stages, in the order they were started: what each computed and how long it took."""
    names = sorted({r.experiment for r in stages})
    rows = [(r.stage_id, r.kind, r.status + (", resumed" if (r.result or {}).get("resumed") else ""), r.result or {},
             (r.result or {}).get("compute_s", (r.result or {}).get("wall_s")), r.dir) for r in stages]
    out.print(_stage_table(f"{', '.join(names)}: stages", rows, time_col="compute (s)"))
    counts = {k: sum(r.status == k for r in stages) for k in ("complete", "interrupted", "incomplete")}
    out.print(", ".join(f"{n} {k}" for k, n in counts.items() if n)
              + ("; an interrupted stage resumes from its checkpoint when its spec runs again" if counts["interrupted"] else ""))


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
    for col in ("status", "val_acc", "density", "compute (s)", "stages ran/reused"):
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
    if "WORLD_SIZE" not in os.environ:  # (distributed.under_launcher(), without importing torch first)
        app()
        return
    # one rank of a DDP job: once its error is reported, it ends at once. Left to the interpreter's
    # shutdown, the process group's threads may still be talking to a peer that is gone, and the
    # C++ runtime aborts the process (exit 134) instead of letting it exit with its own code
    try:
        app()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code == 0:
            raise
        _exit_now(code)
    except BaseException:  # a bug: its traceback, as Python would print it
        traceback.print_exc()
        _exit_now(1)


def _exit_now(code: int) -> None:
    loggers = sys.modules.get("pab_framework.loggers")
    if loggers is not None:  # what atexit would have done: the loggers' files closed
        try:
            loggers.close_loggers()
        except Exception:  # pragma: no cover - the error being reported matters more
            pass
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # pragma: no cover - a closed pipe
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
