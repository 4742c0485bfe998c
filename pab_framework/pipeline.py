"""Run a spec: every stage in topological order, each in its own content-keyed directory,
reused when already complete."""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from . import artifacts, checkpoint, compiling, datacheck, distributed, export
from .blame import plugin_failure
from .context import DistInfo, StageContext, Upstream
from .errors import PabError, SpecError
from .graph import stage_keys, topological_order
from .metrics import finite_figures
from .progress import Reporter
from .specification import ExperimentSpec
from .tracking import Group, open_trackers
from .yamlio import dump_yaml

try:
    import fcntl  # the stage locks
except ImportError:  # pragma: no cover - not POSIX (Windows): no locks
    fcntl = None


class _NoCudaRuntimeNote(logging.Filter):
    """torch.utils.cpp_extension, imported when Inductor compiles for the CPU (Bop's compiled step),
    warns "No CUDA runtime is found, using CUDA_HOME=..." on any machine that has a CUDA toolkit
    but no CUDA device: noise in a CPU run's output. This one message is dropped, nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


logging.getLogger("torch.utils.cpp_extension").addFilter(_NoCudaRuntimeNote())


@dataclass
class StageOutcome:
    stage_id: str
    kind: str
    dir: Path
    result: dict
    reused: bool
    wall_s: float  # this session's seconds on the stage (0 when reused)
    resumed: bool = False  # it went on from a checkpoint an earlier, interrupted session left

    @property
    def status(self) -> str:
        return "reused" if self.reused else "resumed" if self.resumed else "ran"


def stage_dir(spec: ExperimentSpec, stage_id: str, key: str) -> Path:
    return spec.output_root / f"{stage_id}-{key[:12]}"


def pick_device(spec: ExperimentSpec, dist: DistInfo) -> torch.device:
    return distributed.pick_device(spec.runtime, dist)


def check(spec: ExperimentSpec, dist: DistInfo, device: torch.device) -> None:
    """What a spec asks that this job cannot do (processes, devices, runtime.compile): every
    problem, named by its key, before any work."""
    probs = compiling.problems(spec, device)
    try:
        distributed.check(spec, dist, device)
    except SpecError as e:
        probs = [spec.problem(p.path, p.message) for p in e.problems] + probs  # placed: the file's line, or the --set
    if probs:
        raise SpecError(probs) from None


class Step(NamedTuple):
    """One stage of a plan: its id, content key and directory, and whether it is complete there."""

    stage_id: str
    key: str
    dir: Path
    complete: bool


def plan(spec: ExperimentSpec, world_size: int | None = None) -> list[Step]:
    """The stages in the order they run on `world_size` processes (default: runtime.nproc_per_node)."""
    keys = stage_keys(spec, world_size)
    order = topological_order({sid: st.dependencies() for sid, st in spec.stages.items()})
    return [Step(sid, keys[sid], stage_dir(spec, sid, keys[sid]), artifacts.is_complete(stage_dir(spec, sid, keys[sid]))) for sid in order]


def to_run(steps, force: bool = False) -> list[str]:
    """The ids of the stages still to run among `steps` (anything with `stage_id` and `complete`):
    those not complete, or every one with `force`."""
    return [s.stage_id for s in steps if force or not s.complete]


def prepare(spec: ExperimentSpec, world_size: int | None = None, *, force: bool = False, dist: DistInfo | None = None) -> list[Step]:
    """The plan a run follows, made once: under DDP rank 0's, shared with every rank (they must all
    take the same path); then the data the stages to run will read is checked, before the first
    starts (reused stages read none)."""
    dist = dist or DistInfo()
    steps = dist.broadcast_object(plan(spec, world_size))
    datacheck.check_data(spec, to_run(steps, force))
    return steps


@contextmanager
def stage_lock(sdir: Path, reporter: Reporter | None = None):
    """Hold `<experiment dir>/.locks/<stage dir name>.lock` exclusively while a stage is computed, so two processes sharing an
    output directory (two grids, a grid and a `pab run`) never compute the same stage at once.

    An advisory `flock`: released by the kernel when the holder dies, so a crash leaves no stale
    lock. Where `fcntl` is missing (Windows) this does nothing.
    """
    if fcntl is None:  # pragma: no cover - not POSIX
        yield
        return
    locks = sdir.parent / ".locks"  # beside the stage folders, out of the way of listings
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / f"{sdir.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if reporter is not None:
                reporter.log(f"waiting: another process is computing {sdir}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def run_spec(spec: ExperimentSpec, *, force: bool = False, restart: bool = False, reporter: Reporter | None = None,
             dist: DistInfo | None = None, overrides: list[str] | None = None, group: Group | None = None) -> list[StageOutcome]:
    """Run the stages that are not complete (all of them with `force`). A stage that left a
    checkpoint resumes from it, unless `restart` throws its checkpoint away first. `overrides`
    (the `--set` assignments, or a grid run's values) are recorded in each computed stage's spec.yaml;
    `group`: the grid this run belongs to, for the trackers of runtime.loggers (`pab_framework.tracking`)."""
    dist = dist or DistInfo()
    reporter = reporter or Reporter(mode=spec.runtime.progress, enabled=dist.is_main)
    device = pick_device(spec, dist)
    check(spec, dist, device)
    outcomes: dict[str, StageOutcome] = {}
    steps = prepare(spec, dist.world_size, force=force, dist=dist)
    with open_trackers(spec, dist, reporter, group, needed=bool(to_run(steps, force))) as trackers:
        for step in steps:
            st = spec.stages[step.stage_id]
            if step.complete and not force:
                outcomes[step.stage_id] = _reuse(step.stage_id, st.kind, step.dir, reporter)
                continue
            upstream = {d: Upstream(d, outcomes[d].dir, outcomes[d].result) for d in st.dependencies()}
            # one process at a time per stage directory; under DDP every rank takes part in the
            # stage, so the lock (a per-process wait) is left to single-process runs
            with stage_lock(step.dir, reporter) if not dist.enabled else _nolock():
                if dist.broadcast_object(not force and artifacts.is_complete(step.dir)):  # another process finished it meanwhile
                    outcomes[step.stage_id] = _reuse(step.stage_id, st.kind, step.dir, reporter)
                    continue
                ctx = StageContext(spec, step.stage_id, st, step.key, step.dir, upstream, device, reporter, dist, trackers=trackers)
                outcomes[step.stage_id] = _compute(ctx, restart, list(overrides or []))
    return list(outcomes.values())


def stage_doc(ctx: StageContext, overrides: list[str]) -> dict:
    """What a stage's spec.yaml holds: the stage, its key, the overrides of the command that
    computed it, the directories of the stages it started from, and the resolved spec."""
    return {"stage": ctx.stage_id, "key": ctx.key, "overrides": overrides,
            "upstream": {sid: up.dir.name for sid, up in ctx.upstream.items()}, "spec": ctx.spec.resolved_dict()}


def _run_plugin(ctx: StageContext) -> dict:
    """The stage kind's run(): a third-party plugin's failure becomes one message naming it and
    the stage (pab_framework.blame); pab's own failures keep their traceback."""
    try:
        return dict(ctx.stage.plugin.run(ctx))
    except PabError:
        raise
    except Exception as e:
        failure = plugin_failure(e, ctx.stage_id, ctx.stage.kind, ctx.spec.resolved_dict())
        if failure is None:
            raise
        raise failure from e


def _compute(ctx: StageContext, restart: bool, overrides: list[str]) -> StageOutcome:
    """Run one stage in its directory (under its lock): spec.yaml first, result.json last."""
    sid, sdir, dist, reporter = ctx.stage_id, ctx.dir, ctx.dist, ctx.reporter
    kind = ctx.stage.kind
    if restart and dist.is_main and checkpoint.exists(sdir):
        checkpoint.discard(sdir)
        reporter.log(f"[yellow]restart[/]: threw away the checkpoint of {sid}")
    resumed = checkpoint.exists(sdir)  # the stage itself says where it resumes (one line)
    if not resumed:
        reporter.log(f"[bold]running[/] {sid} ({kind}) in {sdir}" + (f" on {dist.world_size} processes" if dist.enabled else ""))
    if dist.is_main:
        sdir.mkdir(parents=True, exist_ok=True)
        # a forced re-run: the stage is incomplete from here until its new result is written
        if (sdir / artifacts.RESULT).exists():
            os.unlink(sdir / artifacts.RESULT)
        for p in export.discard_exports(sdir):  # exported from the stage's earlier model
            reporter.log(f"removed {p.name}: `pab export` wrote it from the stage's earlier model")
        artifacts.atomic_write_text(sdir / artifacts.SPEC, dump_yaml(stage_doc(ctx, overrides)))
    dist.barrier()  # rank 0's directory (and a --restart's discarded checkpoint) before anyone reads it
    t0 = time.perf_counter()
    # the stage's tracker runs, if it trains: continued when it resumes, ended with its files once complete
    with ctx.trackers.stage(ctx, resumed):
        # a figure that is not finite (a diverged validation loss) is missing, not a failed write
        result = finite_figures(_run_plugin(ctx))
        wall = time.perf_counter() - t0
        result.setdefault("wall_s", round(wall, 3))
        # every session's time: this one's and that of the interrupted ones the stage resumed from
        result.setdefault("compute_s", round(result["wall_s"] + ctx.earlier_s, 3))
        result.setdefault("resumed", resumed)
        if (sdir / artifacts.MODEL).is_file():  # what rebuilds the model's shape without the data (pab export, pab_framework.load)
            info = ctx.data_info()
            result.setdefault("data_info", {"num_classes": info.num_classes, "input_shape": list(info.input_shape)})
        if dist.is_main:
            ctx.trackers.flush()  # a file tracker's file is complete before the stage is
            artifacts.atomic_write_json(sdir / artifacts.RESULT, result)
            checkpoint.discard(sdir)  # complete: the result and model.pt supersede it
            ctx.trackers.complete([sdir / artifacts.SPEC, sdir / artifacts.MODEL, sdir / artifacts.RESULT])
        dist.barrier()  # the artifacts are on disk before a later stage on any rank loads them
    return StageOutcome(sid, kind, sdir, result, False, wall, resumed)


@contextmanager
def _nolock():
    yield


def _reuse(sid: str, kind: str, sdir: Path, reporter: Reporter) -> StageOutcome:
    result = artifacts.read_json(sdir / artifacts.RESULT)
    reporter.log(f"[green]reused[/] {sid} ({kind}) from {sdir}")
    return StageOutcome(sid, kind, sdir, result, True, 0.0)
