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
        err.print("error: " + str(e), markup=False)
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
    progress: Optional[str] = typer.Option(None, "--progress", help="auto, rich, plain or none (default: the spec's runtime.progress)."),
    debug: bool = DebugOpt,
):
    """Run every stage of SPEC (complete stages are reused)."""
    from pab_framework.errors import PabError
    from pab_framework.pipeline import run_spec
    from pab_framework.progress import Reporter
    from pab_framework.spec import load_spec

    try:
        s = load_spec(spec, set_ or [])
        reporter = Reporter(out, mode=progress or s.runtime.progress)
        outcomes = run_spec(s, force=force, reporter=reporter)
    except PabError as e:
        _fail(e, debug)
        return
    table = Table(title=f"{s.name}: results")
    for col in ("stage", "kind", "status", "density", "val_acc", "time (s)", "directory"):
        table.add_column(col, overflow="fold")
    for o in outcomes:
        r = o.result
        table.add_row(o.stage_id, o.kind, "reused" if o.reused else "ran", _fmt(r.get("density", "")),
                      _fmt(r["val_acc"]) if "val_acc" in r else "-", _fmt(o.wall_s if not o.reused else r.get("wall_s", 0.0)), _rel(o.dir))
    out.print(table)


@app.command()
def validate(spec: Path = typer.Argument(..., help="The experiment spec (YAML)."), set_: Optional[List[str]] = SetOpt, debug: bool = DebugOpt):
    """Check SPEC without running it: exit 0 when valid, 2 with the problems otherwise."""
    from pab_framework.errors import PabError
    from pab_framework.pipeline import plan
    from pab_framework.spec import load_spec

    try:
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
