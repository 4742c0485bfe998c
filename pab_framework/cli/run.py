"""`pab run` and `pab validate`: a spec checked, then run here or on N processes under DDP."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import PabError
from ..progress import Reporter
from .output import DebugOpt, SetOpt, SpecArg, err, fail, out, rel
from .tables import stage_table


def relaunch_argv(spec: Path, sets: list[str] | None, *, force: bool, restart: bool, progress: str | None, debug: bool) -> list[str]:
    """The `run` command line each of N processes is started with: this one's, less --nproc."""
    return ["run", str(spec), *[a for o in sets or [] for a in ("--set", o)], *(["--force"] if force else []),
            *(["--restart"] if restart else []), *(["--progress", progress] if progress else []), *(["--debug"] if debug else [])]


def _launch(s, n: int, argv: list[str], *, force: bool, debug: bool, max_restarts: int) -> int:
    """Check once what each of N processes would (the DDP setup, the data), then start them
    through torch's elastic launcher (restarting them up to `max_restarts` times); the job's exit code."""
    from .. import distributed, pipeline  # heavy: torch

    pipeline.check(s, distributed.DistInfo(world_size=n, local_world_size=n), distributed.pick_device(s.runtime, distributed.DistInfo()))
    pipeline.prepare(s, n, force=force)  # once, before N processes start
    return distributed.launch(argv, n, max_restarts=max_restarts, debug=debug,
                              log=lambda m: err.print("error: " + m if "failed" in m else m, markup=False))


def _run_here(s, *, force: bool, restart: bool, progress: str | None, overrides: list[str]):
    """Run the spec in this process (one rank of a DDP job under a launcher): (DistInfo, outcomes)."""
    from .. import distributed  # heavy: torch
    from ..pipeline import run_spec

    dist = distributed.from_env()
    with distributed.session(s.runtime, dist):
        reporter = Reporter(out, mode=progress or s.runtime.progress, enabled=dist.is_main)
        return dist, run_spec(s, force=force, restart=restart, reporter=reporter, dist=dist, overrides=overrides)


def run(
    spec: Path = SpecArg,
    set_: Optional[List[str]] = SetOpt,
    force: bool = typer.Option(False, "--force", help="Recompute every stage, even complete ones."),
    restart: bool = typer.Option(False, "--restart", help="Throw away the checkpoints of incomplete stages instead of resuming from them."),
    progress: Optional[str] = typer.Option(None, "--progress", metavar="MODE", help="auto, rich, plain or none (default: the spec's runtime.progress)."),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, max=1024, metavar="N",
                                        help="Processes on this node, started through torch's elastic launcher (default: runtime.nproc_per_node)."),
    max_restarts: Optional[int] = typer.Option(None, "--max-restarts", min=0, max=1000, metavar="N",
                                               help="With several processes: restart them all up to N times when one dies, resuming from "
                                               "the checkpoint (default: runtime.max_restarts)."),
    debug: bool = DebugOpt,
):
    """Run every stage of SPEC (complete stages are reused; interrupted ones resume from their checkpoint).

    With --nproc N (or runtime.nproc_per_node: N) the run is N processes under DistributedDataParallel,
    started through torch's elastic launcher; `torchrun ... -m pab_framework run SPEC` works alike.

    Exit codes: 0 done; 2 bad input (spec, missing data, artifact, plugin) or a non-finite loss; 3 stopped
    by SIGTERM/SIGINT/SIGUSR2 after writing a checkpoint (run again to resume); 4 a write failed (full disk),
    earlier files intact.
    Under several processes the job's code is the failing rank's."""
    from .. import distributed  # heavy: torch
    from ..specification import load_spec  # heavy: the spec's pydantic models

    try:
        s = load_spec(spec, set_ or [])  # a bad spec ends here, before any process starts
        n = nproc or s.runtime.nproc_per_node
        if n > 1 and not distributed.under_launcher():
            argv = relaunch_argv(spec, set_, force=force, restart=restart, progress=progress, debug=debug)
            restarts = s.runtime.max_restarts if max_restarts is None else max_restarts
            raise typer.Exit(_launch(s, n, argv, force=force, debug=debug, max_restarts=restarts))
        if distributed.restarted():  # the launcher's restart after a process died: resume, as --force and --restart were done
            force = restart = False
        dist, outcomes = _run_here(s, force=force, restart=restart, progress=progress, overrides=list(set_ or []))
    except PabError as e:
        fail(e, debug)
        return
    except RuntimeError as e:  # under DDP: a peer that failed first leaves the others a bare socket error
        if debug or not distributed.under_launcher() or not distributed.lost_peer(e):
            raise
        err.print(f"error: [rank {os.environ.get('RANK')}] another rank stopped ({str(e).splitlines()[0][:160]})", markup=False)
        raise typer.Exit(1)
    if not dist.is_main:
        return
    out.print(stage_table(f"{s.name}: results", [(o.stage_id, o.kind, o.status, o.result, o.wall_s, o.dir) for o in outcomes]))


def _check_here(s) -> None:
    """What `pab run` would refuse on this machine (pipeline.check); nothing that needs a device
    this machine lacks (a login node validating a spec for the GPUs of a cluster's nodes)."""
    from .. import distributed, pipeline  # heavy: torch

    try:
        device = distributed.pick_device(s.runtime, distributed.DistInfo())
    except PabError:  # runtime.device: cuda without one here: checked where it runs
        return
    n = s.runtime.nproc_per_node
    pipeline.check(s, distributed.DistInfo(world_size=n, local_world_size=n), device)


def validate(spec: Path = SpecArg, set_: Optional[List[str]] = SetOpt, debug: bool = DebugOpt):
    """Check SPEC (or a grid file, every run of it) without running it: exit 0 when valid, 2 with the problems otherwise."""
    from .. import grid as G  # heavy: torch (the grid package, the pipeline)
    from ..pipeline import prepare
    from ..specification import load_spec

    try:
        if G.looks_like_grid(spec):  # a grid file: validate every run it expands to
            g = G.load_grid(spec, set_ or [])
            G.check_runs_data(g, G.plan_grid(g))
            out.print(f"{spec}: a valid grid ({len(g.runs)} runs of {rel(g.base)}); `pab grid {spec} --dry-run` shows the runs and the stages they share")
            return
        s = load_spec(spec, set_ or [])
        _check_here(s)
        steps = prepare(s)  # a complete stage needs no data
    except PabError as e:
        fail(e, debug)
        return
    out.print(f"{spec}: valid ({len(s.stages)} stages)")
    for step in steps:
        out.print(f"  {step.stage_id:<12} {s.stages[step.stage_id].kind:<10} {'complete' if step.complete else 'to run':<9} {rel(step.dir)}")
