"""`pab export`: a stage's network as a small lossless file (packed), safetensors or ONNX."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import PabError
from ..formatting import fixed, human_bytes
from .output import DebugOpt, fail, out, rel


def export(
    target: Path = typer.Argument(..., metavar="DIR", help="A complete stage directory; with --all, an experiment, output or grid directory."),
    fmt: str = typer.Option("packed", "--format", "-f", metavar="NAME",
                            help="packed (mask and sign bits over the regenerated initialisation), safetensors, onnx (needs the export extra), "
                                 "or another installed pab.exporters plugin."),
    output: Optional[Path] = typer.Option(None, "--out", "-o", metavar="FILE", help="Where the file goes (default: DIR/model.<suffix>)."),
    all_: bool = typer.Option(False, "--all", help="Export every complete stage under DIR, each into its own directory."),
    debug: bool = DebugOpt,
):
    """Export the network a stage found: the packed file holds the initialisation recipe, one mask
    bit per prunable weight and one sign bit per surviving weight, and loads back bitwise
    (`pab_framework.load(path)`); prints each file's size against model.pt."""
    from .. import export as ex  # heavy: torch

    try:
        if all_ and output is not None:
            raise PabError("--out names one file; with --all each stage's file goes into its own directory (leave --out out)")
        dirs = ex.stage_sources(target) if all_ else [target]
        if not dirs:
            raise PabError(f"{target}: no complete stage directories here (an experiment, output or grid directory with finished stages)")
        done = [ex.export_stage(d, fmt, output) for d in dirs]
    except PabError as e:
        fail(e, debug)
        return
    out.print(_table(done))


def _table(done) -> Table:
    table = Table(title=f"pab export: {len(done)} file{'s' if len(done) != 1 else ''}")
    for col in ("stage", "format", "file", "size", "vs model.pt", "density", "contents"):
        table.add_column(col, overflow="fold", justify="right" if col in ("size", "vs model.pt", "density") else "left")
    for e in done:
        d = e.density
        table.add_row(e.source.label, e.format, rel(e.path), human_bytes(e.bytes), f"{e.ratio:.4f}" if e.model_pt_bytes else "-",
                      fixed(d) if isinstance(d, (int, float)) else "-", e.note)
    return table

