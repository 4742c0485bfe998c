"""Where the command line writes, and the options its commands share: the two consoles, a user's
error as one line with its exit code, paths shown relative to here."""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import typer
from rich.console import Console, ConsoleDimensions

from ..errors import PabError

class _Console(Console):
    """rich's Console with its width read when it prints: the terminal's, COLUMNS when set, else
    160 columns (a file or a pipe, where rich would assume 80)."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self._width is None and not self.is_terminal and not os.environ.get("COLUMNS"):
            return ConsoleDimensions(160, size.height)
        return size

    @size.setter
    def size(self, new) -> None:
        Console.size.fset(self, new)


out = _Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

DebugOpt = typer.Option(False, "--debug", help="Show tracebacks.")
SetOpt = typer.Option(None, "--set", "-s", metavar="KEY=VALUE", help="Override a spec value: key.path=value (YAML syntax). Repeatable.")
SpecArg = typer.Argument(..., metavar="SPEC", help="The experiment spec (YAML).")


def fail(e: BaseException, debug: bool) -> None:
    """A PabError as one line on stderr (`error: ...`, or `stopped: ...` for a planned stop) and
    its exit code; anything else raised again. --debug (or PAB_DEBUG) adds the traceback."""
    from ..checkpoint import Interrupted  # heavy: torch (only once an error is being reported)

    if debug or os.environ.get("PAB_DEBUG"):
        traceback.print_exception(e)
    if isinstance(e, PabError):
        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else None
        label = "stopped" if isinstance(e, Interrupted) else "error"  # a planned stop (exit 3) is not an error
        err.print(f"{label}: " + (f"[rank {rank}] " if rank is not None else "") + str(e), markup=False)
        raise typer.Exit(e.exit_code)
    raise e


def rel(p: Path) -> str:
    """`p` relative to the working directory when it is below it, else as given."""
    try:
        return str(Path(p).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(p)
