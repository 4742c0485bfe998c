"""The `pab` command: its commands in the order the help lists them, --version, and the entry
point (`pab`, `python -m pab_framework`, one rank of a DDP job)."""
from __future__ import annotations

import logging
import os
import sys
import traceback
from importlib import metadata

import typer

from .export import export
from .grid import grid
from .help import Command, Group
from .output import out
from .plugins import plugins, schema
from .results import report, results
from .run import run, validate

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=Group,
                  help="Peek-a-Boo experiments: prune at initialisation, then train only the signs of the surviving weights.")
for command in (run, validate, schema, report, plugins, grid, results, export):
    app.command(cls=Command)(command)


def _version(value: bool) -> None:
    if not value:
        return
    import torch  # heavy: torch, and below the spec's models (--help stays fast)

    from ..distributed import DistInfo, pick_device
    from ..specification import RuntimeSpec

    try:
        mine = metadata.version("pab")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        mine = "(not installed)"
    dev = pick_device(RuntimeSpec(), DistInfo())  # what runtime.device: auto picks
    what = f"cuda ({torch.cuda.get_device_name(dev)}, {torch.cuda.device_count()} visible)" if dev.type == "cuda" else "cpu"
    out.print(f"pab {mine}\ntorch {torch.__version__}\ndevice {what} (what runtime.device: auto uses here)", markup=False)
    raise typer.Exit(0)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the pab and torch versions and the device a run would use, and exit.")):
    pass  # the commands do the work; this only holds --version


def main() -> None:
    if "WORLD_SIZE" not in os.environ:  # (distributed.under_launcher(), without importing torch first)
        app()
        return
    # one rank of a DDP job: once its work is done or its error reported, it ends at once. Left to
    # the interpreter's shutdown, the threads of the process group (or of the launcher's store
    # client) may still be talking to a peer that is gone, and the C++ runtime aborts the process
    # ("terminate called without an active exception", exit 134) instead of letting it exit with its own code
    try:
        app()
        _exit_now(0)
    except SystemExit as e:
        _exit_now(e.code if isinstance(e.code, int) else (0 if e.code is None else 1))
    except BaseException:  # a bug: its traceback, as Python would print it
        traceback.print_exc()
        _exit_now(1)


def _exit_now(code: int) -> None:
    # the trackers of runtime.loggers were ended on the way out of the run (pab_framework.tracking)
    logging.shutdown()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # pragma: no cover - a closed pipe
            pass
    os._exit(code)
