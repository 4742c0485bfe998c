"""`pab results` and `pab report`: what a finished experiment or grid holds, as a table or a page."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import PabError
from .output import DebugOpt, fail, out, rel
from .tables import print_contents, print_results, print_stages


def results(directory: Path = typer.Argument(..., metavar="DIR", help="An experiment directory (<output_dir>/<name>/), one stage "
                                             "directory, or a grid directory (<output_dir>/<grid name>/) or its results.json."),
            debug: bool = DebugOpt):
    """Print the results table of an experiment (its stages, from their result.json) or of a grid (from its results.json);
    given the output directory that holds them (runs/), list its experiments and grids."""
    from .. import artifacts  # heavy: torch
    from ..grid import RESULTS_JSON, load_results
    from ..listing import output_contents

    try:
        if not directory.exists():
            raise PabError(f"{directory}: no such directory or file; give an experiment directory (<output_dir>/<name>/), one stage "
                           f"directory, a grid directory, or the output directory that holds them")
        if directory.is_dir() and not (directory / RESULTS_JSON).is_file():
            stages = artifacts.experiment_stages(directory)
            found = [] if stages else output_contents(directory)
            if found:  # the output directory: the experiments and grids in it
                print_contents(directory, found)
                return
            if not stages:
                raise PabError(f"{directory}: no stage directories (<stage>-<key>/ with spec.yaml) and no {RESULTS_JSON} here; give an "
                               f"experiment directory (<output_dir>/<name>/), one stage directory, or a grid directory")
            print_stages(directory, stages)
            return
        res = load_results(directory)
    except PabError as e:
        fail(e, debug)
        return
    print_results(res, directory if directory.is_dir() else directory.parent)


def report(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run directory (runs/<name>/), one stage directory, or a grid directory."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", metavar="DIR", help="Where report.html and the PNGs go (default: RUN_DIR)."),
    debug: bool = DebugOpt,
):
    """Write RUN_DIR/report.html (figures embedded) and its PNGs: curves, flips, per-layer sparsity, FLOPs."""
    from ..report import build_report  # heavy: torch, matplotlib

    try:
        r = build_report(run_dir, out_dir)
    except PabError as e:
        fail(e, debug)
        return
    out.print(f"wrote {rel(r.html)} ({len(r.sections)} sections, {len(r.pngs)} figures)")
