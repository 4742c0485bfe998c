"""Trackers: the loggers of `runtime.loggers` (`pab.loggers` plugins such as csv, tensorboard,
mlflow, wandb, or a package's own), driven beside the training loop and never in its way.

One `Trackers` per run of a spec (`pipeline.run_spec`), on rank 0 only (every other rank's has
no tracker). Each tracker works on a thread of its own: `connect` before the first stage; the
Trainer's `Tracking` callback starts the stage's tracker run once training knows where it stands
and hands over each epoch's figures; the pipeline ends the run once result.json is written
(FINISHED, with the stage's files), or with FAILED or KILLED when an error or a stop signal ends
the stage. The loop itself only puts work on a queue.

A tracker never costs a run: a hook that raises gets one warning and the tracker is left out
from then on; a tracker that has not caught up `wait_s` seconds after the run needs it (reached
at the start; its figures, files and status at a stage's end) gets one warning and is not waited
for again. metrics.jsonl stays the record either way.

The stage directory keeps `trackers.json`: each tracker's run id and the last epoch it took, so
that a stage that resumes from its checkpoint continues the same tracker runs, sending the epochs
they lack and none twice.
"""
from __future__ import annotations

import importlib.util
import json
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from . import artifacts
from .errors import install_command
from .checkpoint import Interrupted, StopSignals
from .metrics import table_files
from .specification import LoggerCall
from .tracker_thread import TrackerThread

if TYPE_CHECKING:  # pragma: no cover
    from .distributed import DistInfo
    from .progress import Reporter
    from .specification import ExperimentSpec

RECORD = "trackers.json"
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"


@dataclass(frozen=True)
class Group:
    """Runs that belong together, the runs of a grid: the name their tracker experiment (or W&B
    group) takes, this run's value of each of the grid's axes (key path -> value) and its label."""

    name: str
    axes: dict[str, Any] = field(default_factory=dict)
    label: str = ""


@dataclass(frozen=True)
class TrackerScope:
    """What a tracker's `connect` gets: where the runs of this spec go."""

    experiment: str  # the grid's name under `pab grid`, else the spec's
    output_dir: Path  # runtime.output_dir, resolved: a tracker's local files go here by default
    base_dir: Path  # the spec file's folder: relative paths in a tracker's parameters resolve against it
    group: str | None  # the grid's name, or None


@dataclass(frozen=True)
class TrackedRun:
    """What a tracker's `start` gets: one training stage, as a tracker run."""

    name: str  # "<stage>-<key12>", or "<stage> <axes>" in a grid
    experiment: str
    group: str | None
    dir: Path  # the stage directory
    stage_id: str
    kind: str
    key: str
    seed: int
    epochs: int
    params: dict[str, str]  # the resolved spec as flattened key paths: {"stages.train.epochs": "15", ...}
    tags: dict[str, str]  # pab.stage, pab.kind, pab.key, pab.seed, pab.experiment, pab.dir; in a grid pab.grid and each axis
    spec: dict  # the resolved spec itself
    resume_id: str | None = None  # the tracker's id of this stage's run when the stage resumes


def needs_package(module: str, extra: str) -> list[tuple[tuple, str]]:
    """For a tracker's `spec_problems`: the spec is refused, with the install command, when
    `module` cannot be imported here."""
    if importlib.util.find_spec(module) is None:
        return [((), f"the {extra} logger needs the {module} package, which is not installed; install it with: {install_command(extra)}")]
    return []


def flat_params(tree: Any, prefix: str = "") -> dict[str, str]:
    """A spec as flattened key paths and text values: nested mappings and lists of mappings are
    walked ("stages.train.transforms.0.name"); other lists and every value become JSON text."""
    if isinstance(tree, dict) and tree:
        items = list(tree.items())
    elif isinstance(tree, list) and any(isinstance(v, (dict, list)) for v in tree):
        items = list(enumerate(tree))
    else:
        return {prefix: tree if isinstance(tree, str) else json.dumps(tree)} if prefix else {}
    out: dict[str, str] = {}
    for k, v in items:
        out.update(flat_params(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def numbers(row: dict) -> dict[str, float]:
    """The figures of a metrics.jsonl line that a tracker takes: every number but `epoch`."""
    return {k: v for k, v in row.items() if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def status_of(error: BaseException) -> str:
    """KILLED for a stop (a signal, Ctrl-C, a job requeued): running again resumes; FAILED otherwise."""
    return KILLED if isinstance(error, (Interrupted, KeyboardInterrupt, SystemExit)) else FAILED


@dataclass(frozen=True)
class Epoch:
    """One epoch's figures, as a tracker's `log_epochs` gets them."""

    epoch: int  # 1-based: the step
    scalars: dict[str, float]  # every number of its metrics.jsonl line but `epoch`
    layers: dict[str, dict[str, dict[str, float]]]  # its per-layer figures: {table: {layer: {column: value}}}


def _keys(calls: list[LoggerCall]) -> list[str]:
    """Each tracker's name in trackers.json: its plugin name, `name#2` for the second of a name."""
    seen: dict[str, int] = {}
    out = []
    for c in calls:
        seen[c.name] = seen.get(c.name, 0) + 1
        out.append(c.name if seen[c.name] == 1 else f"{c.name}#{seen[c.name]}")
    return out


@dataclass
class _Stage:
    """The stage whose tracker runs are open: its context, what trackers.json held when it resumed."""

    ctx: Any  # the stage's StageContext (which holds these Trackers)
    record: dict
    lock: threading.Lock = field(default_factory=threading.Lock)  # trackers.json: written from the trackers' threads
    started: bool = False
    ended: bool = False

    def note(self, key: str, **entry: Any) -> None:
        with self.lock:
            self.record[key] = {**self.record.get(key, {}), **entry}
            artifacts.atomic_write_json(self.ctx.dir / RECORD, self.record)


class Trackers:
    """The trackers of one run of a spec (module docstring); with none, every method does nothing."""

    def __init__(self, trackers: list[TrackerThread] = (), scope: TrackerScope | None = None, group: Group | None = None):
        self.trackers, self.scope, self.group = list(trackers), scope, group
        self._stage: _Stage | None = None

    # ------------------------------------------------------------------ a stage
    @contextmanager
    def stage(self, ctx: Any, resumed: bool) -> Iterator[None]:
        """While a stage is computed. Its tracker runs (if its Trainer starts them) continue those
        of trackers.json when the stage `resumed` from a checkpoint; `complete` ends them, and an
        error that ends the stage ends them FAILED or KILLED."""
        if not self.trackers:
            yield
            return
        record = artifacts.read_json(ctx.dir / RECORD) if resumed and (ctx.dir / RECORD).is_file() else {}
        st = self._stage = _Stage(ctx, record if isinstance(record, dict) else {})
        try:
            with _sigterm_ends_the_stage():
                yield
        except BaseException as e:
            # under DDP a peer's failure reaches this rank first as a socket error, and the launcher's
            # SIGTERM follows within a tenth of a second: held off while the runs end (wait_s at most)
            with StopSignals():
                self._end(st, status_of(e), [])
            raise
        finally:
            self._stage = None

    def start(self, ctx: Any, epochs: int, done: list[dict]) -> None:
        """Start the stage's tracker runs (once; later calls do nothing). `done`: the metrics rows
        of the epochs an interrupted session completed; those a tracker lacks are sent now."""
        st = self._stage
        if st is None or st.started or st.ctx is not ctx:
            return
        st.started = True
        back = _tables_by_epoch(ctx.dir) if done else {}
        for t in self.trackers:
            rec = st.record.get(t.key, {})
            t.through = int(rec.get("through", 0)) if rec.get("run_id") else 0
            t.put("starting its run", self._start, st, t, self._run(ctx, epochs, rec.get("run_id")))
            for row in done:
                if row["epoch"] > t.through:
                    t.put_epoch(st, _epoch(row, back.get(row["epoch"], {})))

    def epoch(self, row: dict, tables: dict) -> None:
        """One epoch's metrics.jsonl line and per-layer figures, queued for every tracker."""
        st = self._stage
        if st is None or not st.started:
            return
        epoch = _epoch(row, tables)
        for t in self.trackers:
            if epoch.epoch > t.through:
                t.put_epoch(st, epoch)

    def flush(self) -> None:
        """Wait (each tracker `wait_s` at most) until the trackers have the stage's figures: before
        result.json marks the stage complete, so that a file tracker's file is complete by then."""
        if self._stage is not None and self._stage.started:
            for t in self.trackers:
                t.wait("logging")

    def complete(self, files: list[Path]) -> None:
        """The stage is complete (result.json written): its files to the trackers, runs FINISHED."""
        if self._stage is not None:
            self._end(self._stage, FINISHED, [f for f in files if f.is_file()])

    # ------------------------------------------------------------------ on the trackers' threads
    def _start(self, st: _Stage, t: TrackerThread, run: TrackedRun) -> None:
        t.handle = t.plugin.start(t.params, t.conn, run)
        rid = t.plugin.run_id(t.params, t.handle)
        st.note(t.key, name=t.call.name, run_id=rid, through=t.through if run.resume_id else 0)

    @staticmethod
    def _finish(t: TrackerThread, status: str, files: list[Path]) -> None:
        try:
            if files:
                t.plugin.log_artifacts(t.params, t.handle, files)
        finally:  # the run ends even when its files do not go
            t.plugin.finish(t.params, t.handle, status)

    def _end(self, st: _Stage, status: str, files: list[Path]) -> None:
        if not st.started or st.ended:
            return
        st.ended = True
        for t in self.trackers:
            t.put(f"ending its run ({status})", self._finish, t, status, files)
        for t in self.trackers:
            t.wait(f"ending its run ({status})")

    def _run(self, ctx: Any, epochs: int, resume_id: str | None) -> TrackedRun:
        spec = ctx.spec.resolved_dict()
        g, scope = self.group, self.scope
        tags = {"pab.experiment": ctx.spec.name, "pab.stage": ctx.stage_id, "pab.kind": ctx.stage.kind, "pab.key": ctx.key,
                "pab.seed": str(ctx.seed), "pab.dir": str(ctx.dir)}
        if g is not None:
            tags["pab.grid"] = g.name
            tags.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in g.axes.items()})
        name = f"{ctx.stage_id} {g.label}" if g is not None and g.label else f"{ctx.stage_id}-{ctx.key[:12]}"
        return TrackedRun(name, scope.experiment, scope.group, ctx.dir, ctx.stage_id, ctx.stage.kind, ctx.key, ctx.seed, epochs,
                          flat_params(spec), tags, spec, resume_id)

    # ------------------------------------------------------------------ the run of a spec
    def close(self) -> None:
        for t in self.trackers:
            t.close()


@contextmanager
def _sigterm_ends_the_stage() -> Iterator[None]:
    """While a tracked stage runs: SIGTERM where nothing else handles it (outside the training loop,
    whose own handler checkpoints and stops) raises SystemExit(143) instead of killing the process
    where it stands, so that the stage's tracker runs end KILLED rather than stay RUNNING."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _epoch(row: dict, tables: dict) -> Epoch:
    """An epoch's metrics.jsonl line and per-layer tables as a tracker gets them (missing figures left out)."""
    layers = {t: {layer: {k: v for k, v in cols.items() if v is not None} for layer, cols in rows.items()} for t, rows in tables.items()}
    return Epoch(int(row["epoch"]), numbers(row), layers)


def _tables_by_epoch(stage_dir: Path) -> dict[int, dict]:
    """The per-layer figures the stage's `<table>.jsonl` files hold: {epoch: {table: {layer: {column: value}}}}."""
    out: dict[int, dict] = {}
    for table, path in table_files(stage_dir).items():
        for line in artifacts.read_jsonl(path):
            cols = {k: v for k, v in line.items() if k not in ("epoch", "layer")}
            out.setdefault(int(line["epoch"]), {}).setdefault(table, {})[str(line["layer"])] = cols
    return out


@contextmanager
def open_trackers(spec: "ExperimentSpec", dist: "DistInfo", reporter: "Reporter", group: Group | None = None, *,
                  needed: bool = True) -> Iterator[Trackers]:
    """The trackers of one run of `spec`, reached before its first stage (each `wait_s` at most;
    past that they go on connecting in the background) and closed when the run ends, however it
    ends: a rank that dies ends its tracker runs first. None but on rank 0, and none when nothing
    is `needed` (every stage reused)."""
    calls = [c for c in spec.runtime.loggers if isinstance(c, LoggerCall)]
    if not (calls and needed and dist.is_main):
        if calls and dist.is_main:  # (a user who adds a tracker to a finished run expects to see it there)
            reporter.log(f"every stage is reused: {', '.join(c.name for c in calls)} get{'s' if len(calls) == 1 else ''} nothing "
                         "(a tracker gets the stages a run computes; --force computes them again)")
        yield Trackers()
        return
    scope = TrackerScope(group.name if group else spec.name, spec.resolve_path(spec.runtime.output_dir), spec.base_dir,
                         group.name if group else None)
    warn = lambda m: reporter.log(f"[yellow]warning[/]: {m}")  # noqa: E731
    indices = [i for i, c in enumerate(spec.runtime.loggers) if isinstance(c, LoggerCall)]
    trackers = Trackers([TrackerThread(k, i, c, warn) for k, i, c in zip(_keys(calls), indices, calls)], scope, group)
    for t in trackers.trackers:
        t.put("connecting", _connect, t, scope)
    for t in trackers.trackers:
        t.wait("connecting")
    try:
        yield trackers
    finally:
        trackers.close()


def _connect(t: TrackerThread, scope: TrackerScope) -> None:
    t.conn = t.plugin.connect(t.params, scope)
