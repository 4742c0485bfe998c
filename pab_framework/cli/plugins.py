"""`pab plugins` and `pab schema`: what is installed, and the JSON Schema specs follow."""
from __future__ import annotations

import json
import sys

from rich.table import Table

from .output import DebugOpt, out


def plugins(debug: bool = DebugOpt):
    """List the installed plugins of every kind, and any that are broken."""
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


def schema(debug: bool = DebugOpt):
    """Print the JSON Schema of specs, with every installed plugin's parameters."""
    from ..schema import spec_schema  # heavy: the spec's pydantic models and every plugin

    sys.stdout.write(json.dumps(spec_schema(), indent=2) + "\n")
