"""`pab plugins` and `pab schema`: what is installed, and the JSON Schema specs follow."""
from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import PabError
from .output import DebugOpt, fail, out


def plugins(name: Optional[str] = typer.Argument(None, metavar="NAME", help="A plugin's name: show its parameters (of every kind that has one by that name)."),
            debug: bool = DebugOpt):
    """List the installed plugins of every kind, and any that are broken; with NAME, that plugin's
    parameters: type, default and description (from the schema `pab schema` prints)."""
    if name is not None:
        _describe(name, debug)
        return
    from ..registry import GROUPS, registry  # heavy: stevedore and the entry points

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


def _describe(name: str, debug: bool) -> None:
    from ..plugin_params import describe  # heavy: the spec's models and every plugin

    try:
        docs = describe(name)
    except PabError as e:
        fail(e, debug)
        return
    for i, d in enumerate(docs):
        out.print(("\n" if i else "") + f"[bold]{d.kind} {escape(d.name)}[/] ({escape(d.target)})" + (f": {escape(d.summary)}" if d.summary else ""))
        if d.broken is not None:
            out.print(f"  [red]broken[/]: {escape(d.broken)}")
            continue
        if not d.params:
            out.print("  no parameters")
            continue
        table = Table(show_edge=False, pad_edge=False)
        for col in ("parameter", "type", "default", "description"):
            table.add_column(col, overflow="fold", ratio=3 if col == "description" else None)
        for p in d.params:
            table.add_row(p.name, p.type, p.default, p.description, style="bold" if p.default == "required" else None)
        out.print(table)
    if any(d.broken for d in docs) and not any(d.params or not d.broken for d in docs):
        raise typer.Exit(2)


def schema(debug: bool = DebugOpt):
    """Print the JSON Schema of specs, with every installed plugin's parameters."""
    from ..schema import spec_schema  # heavy: the spec's pydantic models and every plugin

    sys.stdout.write(json.dumps(spec_schema(), indent=2) + "\n")
