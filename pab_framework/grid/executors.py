"""Running a grid's runs: one run (in a worker process or a job), K at a time on this machine,
or as a SLURM array through submitit."""
from __future__ import annotations

import math
import multiprocessing
import os
import signal
import threading
import time
import traceback
from concurrent import futures
from contextlib import contextmanager
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console

from .. import artifacts
from ..checkpoint import Interrupted, StopSignals
from ..errors import PabError
from ..formatting import as_written
from ..pipeline import run_spec
from ..progress import Reporter
from ..specification import spec_from_dict
from ..tracking import Group
from .gridfile import Grid, Run
from .plan import StagePlan, check_runs_data, plan_grid, schedule
from .results import RESULTS_JSON, write_results
from .slurm import PreemptibleRun, _submitit, make_submitit_executor


def run_one(payload: dict) -> dict:
    """Run one expanded spec (in a worker process or a SLURM job); never raises: a failure is
    recorded with its error, a stop by a signal as `interrupted` (a train stage stopped at a
    step boundary and wrote its checkpoint). Output goes to the run's log file."""
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"run": payload["index"], "status": "failed", "error": None, "stages": [], "run_wall_s": 0.0}
    log_path = Path(payload["log"])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        console = Console(file=log, highlight=False, soft_wrap=True, width=160, force_terminal=False, no_color=True)
        reporter = Reporter(console, mode="plain")
        reporter.log(f"== run {payload['index']}: {payload.get('label', '')} (pid {os.getpid()})")
        try:
            with _interruptible():
                if payload.get("threads"):
                    torch.set_num_threads(int(payload["threads"]))
                spec = spec_from_dict(payload["data"], source=payload["source"], base_dir=Path(payload["base_dir"]))
                group = Group(**payload["group"]) if payload.get("group") else None  # the grid, for the trackers
                outcomes = run_spec(spec, force=bool(payload.get("force")), reporter=reporter, overrides=payload.get("overrides"), group=group)
            rec["stages"] = [
                {"stage": o.stage_id, "kind": o.kind, "dir": str(o.dir), "reused": o.reused, "resumed": o.resumed,
                 "wall_s": float(o.result.get("wall_s", o.wall_s))}
                for o in outcomes
            ]
            rec.update(_metrics([o.result for o in outcomes]))
            rec["status"] = "ok"
        except Interrupted as e:  # a train stage stopped at a step boundary, its checkpoint written
            rec["status"], rec["error"] = "interrupted", str(e).split(" Run the same command again")[0]
            reporter.log(f"stopped: {e}")
        except KeyboardInterrupt:  # outside a training loop: what that stage did so far is redone
            rec["status"], rec["error"] = "interrupted", "SIGINT outside a training loop (while preparing, pruning or writing): that stage starts over"
            reporter.log(f"stopped: {rec['error']}")
        except PabError as e:
            rec["error"] = str(e)
            reporter.log(f"error: {e}")
        except Exception as e:  # a bug or a crash in a plugin: recorded, the other runs go on
            rec["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
            log.write(traceback.format_exc())
        rec["run_wall_s"] = round(time.perf_counter() - t0, 3)
        reporter.log(f"== run {payload['index']} {rec['status']} in {rec['run_wall_s']:.1f}s")
    return rec


@contextmanager
def _interruptible():
    """SIGINT raises KeyboardInterrupt while a run runs (a grid worker ignores it between runs);
    a train stage's own handler turns it into a checkpoint and a stop at the next step."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _metrics(results: list[dict]) -> dict:
    """The run's final val_acc and density (the last stage reporting each), and its compute time."""
    out: dict[str, Any] = {"val_acc": None, "density": None}
    for r in results:
        for k in ("val_acc", "density"):
            if isinstance(r.get(k), (int, float)) and math.isfinite(r[k]):
                out[k] = float(r[k])
    # the run's compute: every stage's, whenever it was computed (reused ones too, resumed ones over every session)
    out["time_s"] = round(sum(float(r.get("compute_s", r.get("wall_s", 0.0))) for r in results), 3)
    return out


def _record_from_disk(plans: list[StagePlan]) -> dict:
    results = [artifacts.read_json(sp.dir / artifacts.RESULT) for sp in plans]
    rec = {"status": "ok", "error": None, "run_wall_s": 0.0,
           "stages": [{"stage": sp.stage_id, "kind": sp.kind, "dir": str(sp.dir), "reused": True, "resumed": False, "wall_s": float(r.get("wall_s", 0.0))}
                      for sp, r in zip(plans, results)]}
    rec.update(_metrics(results))
    return rec


# --------------------------------------------------------------------------- executors
@dataclass
class GridOutcome:
    grid: Grid
    records: dict[int, dict]
    results: dict  # what results.json holds
    submitted: list[str] = field(default_factory=list)  # SLURM job ids when not waiting

    @property
    def failed(self) -> list[int]:
        return [i for i, r in self.records.items() if r["status"] != "ok"]


def run_overrides(run: Run, overrides: list[str] | None = None) -> list[str]:
    """What made this run differ from the base spec, as `key=value` assignments: the command
    line's `--set`, then the run's grid values (recorded in the spec.yaml of each stage it computes)."""
    return [*(overrides or []), *(f"{k}={as_written(v)}" for k, v in run.varied.items())]


def _payload(grid: Grid, run: Run, force: bool, threads: int | None, overrides: list[str] | None = None) -> dict:
    return {
        "index": run.index,
        "label": run.label(),
        "data": run.data,
        "source": str(grid.base),
        "base_dir": str(grid.base.resolve().parent),
        "log": str(grid.dir / "logs" / f"run-{run.index:04d}.log"),
        "force": force,
        "threads": threads,
        "overrides": run_overrides(run, overrides),
        "group": {"name": grid.name, "axes": dict(run.varied), "label": run.label()},
    }


def run_grid(
    grid: Grid,
    *,
    executor: str = "local",
    workers: int = 1,
    force: bool = False,
    on_record: Callable[[Run, dict], None] | None = None,
    cluster: str = "slurm",
    wait: bool = True,
    overrides: list[str] | None = None,
) -> GridOutcome:
    """Run every run of the grid that is not complete; write the results after each one. A signal
    (SIGINT, SIGTERM, SIGHUP) stops the local runs in flight at their next step boundary, starts no
    new one, writes the results so far and raises Interrupted (exit 3): run again to resume."""
    plans = plan_grid(grid)
    check_runs_data(grid, plans, force)  # before the first run starts
    records: dict[int, dict] = {}
    grid.dir.mkdir(parents=True, exist_ok=True)

    def record(run: Run, rec: dict) -> None:
        rec["run"] = run.index
        records[run.index] = rec
        write_results(grid, records)
        if on_record:
            on_record(run, rec)

    todo = []
    for run in grid.runs:
        if not force and all(sp.complete for sp in plans[run.index]):
            record(run, _record_from_disk(plans[run.index]))
        else:
            todo.append(run)
    queue = schedule(todo, plans) if not force else todo
    submitted: list[str] = []
    stopped_by = None
    if queue:
        if executor == "local":
            stopped_by = _run_local(grid, queue, workers, force, record, overrides)
        elif executor == "slurm":
            submitted = _run_submitit(grid, queue, force, record, cluster, wait, overrides)
        else:
            raise PabError(f"unknown executor {executor!r}: use local or slurm")
    results = write_results(grid, records)
    if stopped_by is not None:
        raise Interrupted(stopped_message(stopped_by, grid, queue, records))
    return GridOutcome(grid, {i: records[i] for i in sorted(records)}, results, submitted)


def _runs(indices: list[int]) -> str:
    return f"run{'s' if len(indices) != 1 else ''} {', '.join(map(str, indices[:12]))}{'...' if len(indices) > 12 else ''}"


def stopped_message(signame: str, grid: Grid, queue: list[Run], records: dict[int, dict]) -> str:
    """What a signal stopped: the runs it interrupted, those it kept from starting, where the
    results are, and how to go on."""
    cut = [r.index for r in queue if records.get(r.index, {}).get("status") == "interrupted"]
    finished = [r.index for r in queue if r.index in records and r.index not in cut]
    waiting = [r.index for r in queue if r.index not in records]
    parts = [f"{_runs(cut)} interrupted (a train stage wrote a checkpoint at its next step boundary; each run's line above says where)"
             if cut else "no run was in progress"]
    if waiting:
        parts.append(f"{len(waiting)} not started")
    if finished:
        parts.append(f"{len(finished)} finished before the signal")
    return (f"{signame} while grid {grid.name} ran: " + "; ".join(parts) + f". The results so far are in {grid.dir / RESULTS_JSON}. "
            f"Run the same command again to resume (exit code {Interrupted.exit_code}).")


def _failed(error: str) -> dict:
    return {"status": "failed", "error": error, "stages": [], "run_wall_s": 0.0, "val_acc": None, "density": None, "time_s": None}


def _worker_init() -> None:
    """A local grid worker: in a process group of its own, so that a Ctrl-C in the terminal reaches
    the grid's main process alone, which passes one SIGINT on to each worker (see _Stop); and
    deaf to SIGINT between runs (run_one listens while a run runs)."""
    if hasattr(os, "setpgrp"):
        os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Stop(StopSignals):
    """While local runs are in flight: SIGINT, SIGTERM or SIGHUP to the grid sends each worker
    SIGINT (its train stage checkpoints at the next step boundary and stops; a stage outside a
    training loop stops at once) and starts no new run. A second signal is passed on too: the
    workers stop at once, without a checkpoint. `requested` names the first signal."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))

    def __init__(self):
        super().__init__()
        self.pool: futures.ProcessPoolExecutor | None = None

    def _handler(self, signum, frame) -> None:
        self.requested = self.requested or signal.Signals(signum).name
        for proc in list((getattr(self.pool, "_processes", None) or {}).values()):
            try:
                os.kill(proc.pid, signal.SIGINT)
            except (ProcessLookupError, PermissionError):  # gone already
                pass


def _run_local(grid: Grid, queue: list[Run], workers: int, force: bool, record, overrides: list[str] | None = None) -> str | None:
    """The runs of `queue`, `workers` at a time, each in a worker process; the name of the signal
    that stopped them, or None when every run finished."""
    if workers < 1:
        raise PabError(f"--workers must be at least 1 (got {workers})")
    workers = min(workers, len(queue))
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no forked torch state

    def new_pool() -> futures.ProcessPoolExecutor:
        return futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init)

    pending = list(queue)
    inflight: dict[Any, Run] = {}
    with _Stop() as stop:
        stop.pool = pool = new_pool()
        try:
            while inflight or (pending and stop.requested is None):
                while pending and len(inflight) < workers and stop.requested is None:
                    run = pending.pop(0)
                    inflight[pool.submit(run_one, _payload(grid, run, force, threads, overrides))] = run
                done, _ = futures.wait(list(inflight), timeout=1.0, return_when=futures.FIRST_COMPLETED)
                if _collect(done, inflight, record):  # the pool is unusable: the runs still in it died with it
                    for f, run in list(inflight.items()):
                        record(run, _failed(WORKER_DIED))
                    inflight.clear()
                    pool.shutdown(wait=False, cancel_futures=True)
                    stop.pool = pool = new_pool()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return stop.requested


WORKER_DIED = "its worker process died (killed, or crashed outside Python); see its log"


def _collect(done, inflight: dict, record) -> bool:
    """Record the finished futures' runs; whether the pool broke."""
    broken = False
    for f in done:
        run = inflight.pop(f)
        try:
            rec = f.result()
        except BrokenProcessPool:
            broken = True
            rec = _failed(WORKER_DIED)
        except Exception as e:  # pragma: no cover - run_one catches what it can
            rec = _failed(f"{type(e).__name__}: {e}")
        record(run, rec)
    return broken


def _run_submitit(grid: Grid, queue: list[Run], force: bool, record, cluster: str, wait: bool, overrides: list[str] | None = None) -> list[str]:
    submitit = _submitit()
    ex = make_submitit_executor(grid, cluster)
    jobs = []
    with ex.batch():  # one array job on SLURM
        for run in queue:
            jobs.append((run, ex.submit(PreemptibleRun(run_one), _payload(grid, run, force, None, overrides))))
    if not wait:
        return [j.job_id for _, j in jobs]
    by_job = {id(j): run for run, j in jobs}
    for job in submitit.helpers.as_completed([j for _, j in jobs], poll_frequency=1):
        run = by_job[id(job)]
        try:
            rec = job.result()
        except Exception as e:  # the job itself failed (timeout, killed, node failure)
            rec = _failed(f"job {job.job_id} failed: {str(e).strip().splitlines()[-1][:500] if str(e).strip() else type(e).__name__}")
        rec["job_id"] = job.job_id
        record(run, rec)
    return [j.job_id for _, j in jobs]


