"""Ablation grids: one file expands into many runs of a base spec; runs that share a stage (same
content key) share its directory, so it is computed once; runs go K at a time on this machine or
as a SLURM array through submitit; the results are one table (`results.csv`, `results.json`).

A grid file::

    base: cifar10_r18_pab.yaml            # a spec, relative to this file
    name: ablation_pruners                # optional; default: the file's stem
    grid:                                 # cartesian product, first key varies slowest
      stages.prune.pruner.name: [synflow, magnitude]
      seed: [0, 1, 2]
    zip:                                  # optional: lists of equal length that vary together
      stages.train.optimizer.ar: [1.0e-3, 1.0e-4]
      stages.train.optimizer.tau: [1.0e-6, 1.0e-7]
    set: {stages.train.epochs: 60}        # optional: the same override for every run
    slurm: {partition: gpu, time: "12:00:00", gpus_per_node: 1, cpus_per_task: 8}

Every run keeps the base spec's `name`, so its stages go where a single `pab run` of the same
spec would put them, and any stage already computed there (by a run, or another grid) is reused.
The grid's own directory, `<runtime.output_dir>/<grid name>/`, holds the results and run logs.
"""
from __future__ import annotations

import copy
import csv
import difflib
import io
import itertools
import json
import math
import os
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import PabError, Problem, SpecError
from .spec import NAME_PATTERN, ExperimentSpec, problems_from_validation, set_path, spec_from_dict
from .yamlio import LoadedYaml, load_yaml_file, parse_scalar

GRID_KEYS = ("base", "name", "grid", "zip", "set", "slurm")
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"


class GridError(SpecError):
    """A grid file that does not validate, or a run of it that does not."""


def _grid_error(problems: list[Problem], title: str = "invalid grid") -> GridError:
    return GridError(problems, title=title)


# --------------------------------------------------------------------------- slurm options
def _minutes(v: Union[int, str]) -> int:
    """SLURM time: minutes, or "MM:SS", "HH:MM:SS", "D-HH:MM:SS", "D-HH"."""
    if isinstance(v, int):
        return v
    s = str(v).strip()
    days = 0
    if "-" in s:
        d, s = s.split("-", 1)
        days = int(d)
        parts = [int(x) for x in s.split(":")]
        parts += [0] * (3 - len(parts))
        h, m, sec = parts
    else:
        parts = [int(x) for x in s.split(":")]
        if len(parts) == 1:
            return parts[0]
        if len(parts) == 2:
            h, m, sec = 0, parts[0], parts[1]
        else:
            h, m, sec = parts
    return days * 1440 + h * 60 + m + (1 if sec else 0)


class SlurmOptions(BaseModel):
    """The grid file's `slurm:` section (command-line flags override it)."""

    model_config = ConfigDict(extra="forbid")
    partition: Optional[str] = Field(None, description="SLURM partition.")
    time: Union[int, str] = Field(60, description="Time limit per run: minutes, or HH:MM:SS / D-HH:MM:SS.")
    gpus_per_node: Optional[int] = Field(None, ge=0, le=64, description="GPUs per run.")
    cpus_per_task: Optional[int] = Field(None, ge=1, le=1024, description="CPUs per run.")
    mem_gb: Optional[float] = Field(None, gt=0, description="Memory per run, in GB.")
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    array_parallelism: int = Field(256, ge=1, description="At most this many runs of the array at once.")
    setup: list[str] = Field(default_factory=list, description="Shell lines run in the job before the run (module load, conda activate).")
    additional: dict[str, Any] = Field(default_factory=dict, description="Any other sbatch option, e.g. {mail-type: END}.")

    def minutes(self) -> int:
        try:
            m = _minutes(self.time)
        except ValueError:
            raise PabError(f"slurm time {self.time!r} is not minutes or [D-]HH:MM:SS") from None
        if m <= 0:
            raise PabError(f"slurm time {self.time!r} must be positive")
        return m


# --------------------------------------------------------------------------- the grid
@dataclass
class Run:
    index: int  # 1-based, in expansion order
    varied: dict[str, Any]  # grid and zip key -> this run's value
    data: dict  # the run's spec as a dict (base + set + varied)
    spec: ExperimentSpec

    def label(self) -> str:
        return " ".join(f"{short}={_show(self.varied[k])}" for k, short in zip(self.varied, short_names(list(self.varied))))


@dataclass
class Grid:
    path: Path
    name: str
    base: Path
    axes: dict[str, list]
    zipped: dict[str, list]
    fixed: dict[str, Any]
    slurm: SlurmOptions
    runs: list[Run] = field(default_factory=list)

    @property
    def varied_keys(self) -> list[str]:
        return list(self.axes) + list(self.zipped)

    @property
    def dir(self) -> Path:
        """Where the grid's results and logs go: `<output_dir>/<grid name>/` of its first run."""
        spec = self.runs[0].spec
        return spec.resolve_path(spec.runtime.output_dir) / self.name


def _show(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


RESULT_COLUMNS = ("run", "status", "val_acc", "density", "time_s", "time", "seeds", "ok")


def short_names(keys: list[str]) -> list[str]:
    """The shortest unambiguous dotted suffix of every key (`pruner.density`, `seed`), for headers;
    never a bare `name` nor the name of a results column."""
    out = []
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            cand = ".".join(parts[-n:])
            clash = any(o != k and o.split(".")[-n:] == parts[-n:] for o in keys)
            generic = n == 1 and len(parts) > 1 and parts[-1] in ("name", "kind", "value", *RESULT_COLUMNS)
            if not clash and not generic:
                break
        out.append(cand)
    return out


def expand(axes: dict[str, list], zipped: dict[str, list] | None = None) -> list[dict[str, Any]]:
    """Every combination: the cartesian product of `axes` (first key slowest) times the `zipped`
    lists taken together (they must have equal lengths)."""
    zipped = zipped or {}
    lengths = {k: len(v) for k, v in zipped.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError("zip lists must have equal lengths: " + ", ".join(f"{k} has {n}" for k, n in lengths.items()))
    for k, v in list(axes.items()) + list(zipped.items()):
        if not isinstance(v, list) or not v:
            raise ValueError(f"{k}: needs a non-empty list of values")
    zip_rows = [dict(zip(zipped, vals)) for vals in zip(*zipped.values())] if zipped else [{}]
    combos = []
    for vals in itertools.product(*axes.values()):
        for z in zip_rows:
            combos.append({**dict(zip(axes, vals)), **z})
    return combos


def _check_section(loaded: LoadedYaml, section: str, source: str, lists: bool) -> tuple[dict, list[Problem]]:
    raw = loaded.data.get(section)
    if raw is None:
        return {}, []
    if not isinstance(raw, dict):
        return {}, [Problem((section,), f"must be a mapping of key paths to {'lists of values' if lists else 'values'} (got {type(raw).__name__})", loaded.line_of((section,)), source)]
    problems = []
    out = {}
    for k, v in raw.items():
        line = loaded.line_of((section, k))
        if not isinstance(k, str) or not KEY_PATTERN.match(k):
            problems.append(Problem((section, k), "a key path looks like stages.prune.pruner.density (names and list indices joined by dots)", line, source))
            continue
        if lists:
            if isinstance(v, dict):
                problems.append(Problem((section, k), f"needs a list of values, found a mapping; write the full key path with dots (e.g. {k}.{next(iter(v), 'key')}: [...])", line, source))
                continue
            if not isinstance(v, list) or not v:
                problems.append(Problem((section, k), f"needs a non-empty list of values (got {v!r}); a value for every run belongs in set:", line, source))
                continue
        out[k] = v
    return out, problems


def looks_like_grid(path: str | Path) -> bool:
    """Whether `path` is a grid file (a mapping with `base:` and `grid:` or `zip:`), not a spec.
    False for anything unreadable: loading it as a spec then reports the problem."""
    try:
        data = load_yaml_file(path).data  # the spec loader's guards (size, depth, tags) apply
    except PabError:
        return False
    return isinstance(data, dict) and "base" in data and ("grid" in data or "zip" in data)


def load_grid(path: str | Path, overrides: list[str] | None = None) -> Grid:
    """Read a grid file, expand it, and validate every run; the first invalid run stops it
    (GridError naming the run and the key, with the file and line of the value that set it)."""
    path = Path(path)
    source = str(path)
    loaded = load_yaml_file(path, what="grid")
    data = loaded.data
    problems: list[Problem] = []
    for k in data:
        if k not in GRID_KEYS:
            close = difflib.get_close_matches(str(k), GRID_KEYS, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(Problem((k,), f"unknown key {k!r}{hint} Allowed here: {', '.join(GRID_KEYS)}", loaded.line_of((k,)), source))
    base_raw = data.get("base")
    if not isinstance(base_raw, str) or not base_raw.strip():
        problems.append(Problem(("base",), "required: the path of the base spec (relative to this file)", loaded.line_of(("base",)), source))
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not re.match(NAME_PATTERN, name):
        why = "must start with a letter or digit and hold only letters, digits, '_', '.', '-'"
        if "name" in data:
            problems.append(Problem(("name",), f"grid name {name!r} {why}", loaded.line_of(("name",)), source))
        else:
            problems.append(Problem((), f"the grid's name comes from its file name, {name!r}, which {why.replace('must', 'does not')}; set name: in the file", None, source))
    axes, p1 = _check_section(loaded, "grid", source, lists=True)
    zipped, p2 = _check_section(loaded, "zip", source, lists=True)
    fixed, p3 = _check_section(loaded, "set", source, lists=False)
    problems += p1 + p2 + p3
    lengths = {k: len(v) for k, v in zipped.items()}
    if len(set(lengths.values())) > 1:
        first = next(iter(zipped))
        for k, n in lengths.items():
            if n != lengths[first]:
                problems.append(Problem(("zip", k), f"zip lists must have equal lengths: {k} has {n} values, {first} has {lengths[first]}", loaded.line_of(("zip", k)), source))
    seen: dict[str, str] = {}
    for section, keys in (("grid", axes), ("zip", zipped), ("set", fixed)):
        for k in keys:
            if k in seen:
                problems.append(Problem((section, k), f"{k} is set in both {seen[k]}: and {section}:", loaded.line_of((section, k)), source))
            seen.setdefault(k, section)
    slurm_raw = data.get("slurm") or {}
    slurm = SlurmOptions()
    if not isinstance(slurm_raw, dict):
        problems.append(Problem(("slurm",), "must be a mapping (partition, time, gpus_per_node, cpus_per_task, ...)", loaded.line_of(("slurm",)), source))
    else:
        try:
            slurm = SlurmOptions.model_validate(slurm_raw)
        except ValidationError as err:
            for p, msg in problems_from_validation(err, ("slurm",), SlurmOptions):
                problems.append(Problem(p, msg, loaded.line_of(p), source))
    if problems:
        raise _grid_error(problems)

    base = Path(base_raw).expanduser()
    if not base.is_absolute():
        base = path.resolve().parent / base
    if not base.is_file():
        raise _grid_error([Problem(("base",), f"base spec {base} not found (the path is relative to the grid file)", loaded.line_of(("base",)), source)])
    base_loaded = load_yaml_file(base)

    # where each override came from, for errors: (grid section, key) or the --set text
    cli_set: dict[str, Any] = {}
    for a in overrides or []:
        if "=" not in a:
            raise _grid_error([Problem((), f"override {a!r} must look like key.path=value", None, "--set")])
        k, raw = a.split("=", 1)
        cli_set[k.strip()] = parse_scalar(raw)

    grid = Grid(path=path, name=name, base=base, axes=axes, zipped=zipped, fixed=fixed, slurm=slurm)
    combos = expand(axes, zipped)
    bad: list[tuple[Run | int, GridError]] = []
    for i, combo in enumerate(combos, 1):
        run_data = copy.deepcopy(base_loaded.data)
        origin: dict[tuple, Problem] = {}
        try:
            for section, items in (("set", fixed), ("--set", cli_set), ("grid", {k: v for k, v in combo.items() if k in axes}), ("zip", {k: v for k, v in combo.items() if k in zipped})):
                for k, v in items.items():
                    if section == "--set":
                        where = Problem((), "", None, f"--set {k}=...")
                    else:
                        vals = axes.get(k) if section == "grid" else zipped.get(k) if section == "zip" else None
                        idx = vals.index(v) if vals is not None else None
                        loc = (section, k) if idx is None else (section, k, idx)
                        where = Problem((), "", loaded.line_of(loc), source)
                    try:
                        origin[set_path(run_data, k, v, k)] = where
                    except SpecError as e:
                        raise _grid_error([Problem(p.path, p.message, where.line, where.source) for p in e.problems]) from None
            spec = spec_from_dict(run_data, source=str(base), loaded=base_loaded, base_dir=base.resolve().parent)
            if spec.runtime.nproc_per_node > 1:  # grid runs are single processes: never ignore it silently
                path_ = ("runtime", "nproc_per_node")
                raise SpecError([Problem(path_, f"is {spec.runtime.nproc_per_node}, but a grid runs each run in one process; set it to 1 "
                                         "for the grid (`--set runtime.nproc_per_node=1`), or run a multi-process spec with `pab run --nproc`",
                                         base_loaded.line_of(path_), str(base))])
        except SpecError as e:
            probs = []
            for p in e.problems:
                over = next((w for op, w in origin.items() if tuple(p.path[: len(op)]) == op), None)
                probs.append(Problem(p.path, p.message, over.line, over.source) if over is not None else p)
            label = " ".join(f"{s}={_show(combo[k])}" for k, s in zip(combo, short_names(list(combo))))
            bad.append((i, _grid_error(probs, title=f"invalid grid {source}: run {i} of {len(combos)}" + (f" ({label})" if label else ""))))
            continue
        grid.runs.append(Run(i, combo, run_data, spec))
    if bad:
        first = bad[0][1]
        if len(bad) > 1:
            first.title += f" (and {len(bad) - 1} more invalid run{'s' if len(bad) > 2 else ''}: {', '.join(str(b[0]) for b in bad[1:6])}{'...' if len(bad) > 6 else ''})"
            first.message = first.render()
            first.args = (first.message,)
        raise first
    return grid


# --------------------------------------------------------------------------- the plan
@dataclass
class StagePlan:
    stage_id: str
    kind: str
    key: str
    dir: Path
    complete: bool
    shared_by: list[int]  # run indices using this directory


def plan_grid(grid: Grid) -> dict[int, list[StagePlan]]:
    """For every run, its stages in order: directory, completeness, and which runs share it."""
    from .pipeline import plan

    users: dict[Path, list[int]] = {}
    per_run: dict[int, list[tuple]] = {}
    for run in grid.runs:
        per_run[run.index] = plan(run.spec)
        for _, _, d, _ in per_run[run.index]:
            users.setdefault(d, []).append(run.index)
    return {
        i: [StagePlan(sid, grid.runs[0].spec.stages[sid].kind if sid in grid.runs[0].spec.stages else "?", key, d, done, users[d]) for sid, key, d, done in rows]
        for i, rows in per_run.items()
    }


def check_runs_data(grid: Grid, plans: dict[int, list[StagePlan]], force: bool = False) -> None:
    """The data every run's stages to compute will read is there (pab_framework.datacheck); one
    GridError naming each problem and the runs it stops, before any run starts."""
    from . import datacheck

    found: dict[str, list[int]] = {}
    for run in grid.runs:
        ids = [sp.stage_id for sp in plans[run.index] if force or not sp.complete]
        for p in datacheck.problems(run.spec, ids, name_stages=False):
            found.setdefault(p.render(), []).append(run.index)
    if found:
        def runs(r: list[int]) -> str:
            if len(r) == len(grid.runs) > 1:
                return f"all {len(r)} runs"
            return f"run{'s' if len(r) > 1 else ''} {', '.join(map(str, r[:8]))}{'...' if len(r) > 8 else ''}"

        raise _grid_error([Problem((), f"{msg} ({runs(r)})") for msg, r in found.items()], title="missing data")


def plan_summary(plans: dict[int, list[StagePlan]]) -> list[dict]:
    """Per stage id: how many runs, how many distinct directories, how many already complete."""
    out: dict[str, dict] = {}
    for rows in plans.values():
        for sp in rows:
            s = out.setdefault(sp.stage_id, {"stage": sp.stage_id, "runs": 0, "dirs": set(), "complete": set()})
            s["runs"] += 1
            s["dirs"].add(sp.dir)
            if sp.complete:
                s["complete"].add(sp.dir)
    return [{"stage": s["stage"], "runs": s["runs"], "distinct": len(s["dirs"]), "complete": len(s["complete"])} for s in out.values()]


# --------------------------------------------------------------------------- one run
def run_one(payload: dict) -> dict:
    """Run one expanded spec (in a worker process or a SLURM job); never raises: a failure is
    recorded with its error. Output goes to the run's log file."""
    from rich.console import Console

    from .pipeline import run_spec
    from .progress import Reporter

    t0 = time.perf_counter()
    rec: dict[str, Any] = {"run": payload["index"], "status": "failed", "error": None, "stages": [], "run_wall_s": 0.0}
    log_path = Path(payload["log"])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        console = Console(file=log, highlight=False, soft_wrap=True, width=160, force_terminal=False, no_color=True)
        reporter = Reporter(console, mode="plain")
        reporter.log(f"== run {payload['index']}: {payload.get('label', '')} (pid {os.getpid()})")
        try:
            if payload.get("threads"):
                import torch

                torch.set_num_threads(int(payload["threads"]))
            spec = spec_from_dict(payload["data"], source=payload["source"], base_dir=Path(payload["base_dir"]))
            outcomes = run_spec(spec, force=bool(payload.get("force")), reporter=reporter)
            rec["stages"] = [
                {"stage": o.stage_id, "kind": o.kind, "dir": str(o.dir), "reused": o.reused, "wall_s": float(o.result.get("wall_s", o.wall_s))}
                for o in outcomes
            ]
            rec.update(_metrics([o.result for o in outcomes]))
            rec["status"] = "ok"
        except PabError as e:
            rec["error"] = str(e)
            reporter.log(f"error: {e}")
        except Exception as e:  # a bug or a crash in a plugin: recorded, the other runs go on
            rec["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
            log.write(traceback.format_exc())
        rec["run_wall_s"] = round(time.perf_counter() - t0, 3)
        reporter.log(f"== run {payload['index']} {rec['status']} in {rec['run_wall_s']:.1f}s")
    return rec


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
    from . import artifacts

    results = [artifacts.read_json(sp.dir / artifacts.RESULT) for sp in plans]
    rec = {"status": "ok", "error": None, "run_wall_s": 0.0,
           "stages": [{"stage": sp.stage_id, "kind": sp.kind, "dir": str(sp.dir), "reused": True, "wall_s": float(r.get("wall_s", 0.0))} for sp, r in zip(plans, results)]}
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


def _payload(grid: Grid, run: Run, force: bool, threads: int | None) -> dict:
    return {
        "index": run.index,
        "label": run.label(),
        "data": run.data,
        "source": str(grid.base),
        "base_dir": str(grid.base.resolve().parent),
        "log": str(grid.dir / "logs" / f"run-{run.index:04d}.log"),
        "force": force,
        "threads": threads,
    }


def _schedule(todo: list[Run], plans: dict[int, list[StagePlan]]) -> list[Run]:
    """Runs whose stages nobody before them computes go first: shared stages are then computed
    in parallel, not waited on by the runs that reuse them."""
    counts: dict[Path, int] = {}
    ranked = []
    for run in todo:
        rank = max((counts.get(sp.dir, 0) for sp in plans[run.index] if not sp.complete), default=0)
        for sp in plans[run.index]:
            counts[sp.dir] = counts.get(sp.dir, 0) + 1
        ranked.append((rank, run.index, run))
    return [r for _, _, r in sorted(ranked, key=lambda t: (t[0], t[1]))]


def run_grid(
    grid: Grid,
    *,
    executor: str = "local",
    workers: int = 1,
    force: bool = False,
    on_record: Callable[[Run, dict], None] | None = None,
    cluster: str = "slurm",
    wait: bool = True,
) -> GridOutcome:
    """Run every run of the grid that is not complete; write the results after each one."""
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
    queue = _schedule(todo, plans) if not force else todo
    submitted: list[str] = []
    if queue:
        if executor == "local":
            _run_local(grid, queue, workers, force, record)
        elif executor == "slurm":
            submitted = _run_submitit(grid, queue, force, record, cluster, wait)
        else:
            raise PabError(f"unknown executor {executor!r}: use local or slurm")
    results = write_results(grid, records)
    return GridOutcome(grid, {i: records[i] for i in sorted(records)}, results, submitted)


def _failed(error: str) -> dict:
    return {"status": "failed", "error": error, "stages": [], "run_wall_s": 0.0, "val_acc": None, "density": None, "time_s": None}


def _run_local(grid: Grid, queue: list[Run], workers: int, force: bool, record) -> None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    if workers < 1:
        raise PabError(f"--workers must be at least 1 (got {workers})")
    workers = min(workers, len(queue))
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no forked torch state
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    pending = list(queue)
    inflight: dict[Any, Run] = {}
    try:
        while pending or inflight:
            while pending and len(inflight) < workers:
                run = pending.pop(0)
                inflight[pool.submit(run_one, _payload(grid, run, force, threads))] = run
            done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            broken = False
            for f in done:
                run = inflight.pop(f)
                try:
                    rec = f.result()
                except BrokenProcessPool:
                    broken = True
                    rec = _failed("its worker process died (killed, or crashed outside Python); see its log")
                except Exception as e:  # pragma: no cover - run_one catches what it can
                    rec = _failed(f"{type(e).__name__}: {e}")
                record(run, rec)
            if broken:  # the pool is unusable: the runs still in it died with it
                for f, run in list(inflight.items()):
                    record(run, _failed("its worker process died (killed, or crashed outside Python); see its log"))
                inflight.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


# --------------------------------------------------------------------------- SLURM (submitit)
def slurm_parameters(grid: Grid, opts: SlurmOptions) -> dict:
    """submitit SlurmExecutor parameters (sbatch options) from the grid's `slurm:` section."""
    p: dict[str, Any] = {"job_name": f"pab-{grid.name}", "time": opts.minutes(), "array_parallelism": opts.array_parallelism}
    for k in ("partition", "gpus_per_node", "cpus_per_task", "account", "qos", "constraint"):
        v = getattr(opts, k)
        if v is not None:
            p[k] = v
    if opts.mem_gb is not None:
        p["mem"] = f"{int(math.ceil(opts.mem_gb))}GB"
    if opts.setup:
        p["setup"] = list(opts.setup)
    if opts.additional:
        p["additional_parameters"] = dict(opts.additional)
    return p


def slurm_folder(grid: Grid) -> Path:
    return grid.dir / "slurm"


def _submitit():
    try:
        import submitit
    except ImportError:
        raise PabError("the slurm executor needs submitit: pip install 'pab[slurm]'") from None
    return submitit


def sbatch_script(grid: Grid, n_runs: int | None = None) -> str:
    """The sbatch script `--executor slurm` submits (an array of the runs), built without submitting."""
    _submitit()
    from submitit.slurm.slurm import _make_sbatch_string

    folder = slurm_folder(grid) / "%j"
    n = len(grid.runs) if n_runs is None else n_runs
    command = " ".join([sys.executable, "-u -m submitit.core._submit", str(folder)])
    params = slurm_parameters(grid, grid.slurm)
    try:
        return _make_sbatch_string(command=command, folder=folder, map_count=n if n > 1 else None, **params)
    except (ValueError, TypeError) as e:
        raise PabError(f"slurm options are not usable: {e}") from None


def make_submitit_executor(grid: Grid, cluster: str = "slurm"):
    """A submitit executor for the grid: `slurm` (sbatch, array jobs), or `local` / `debug`
    (submitit's own executors on this machine, to try the path without a cluster)."""
    submitit = _submitit()
    folder = slurm_folder(grid) / "%j"
    opts = grid.slurm
    if cluster == "slurm":
        try:
            ex = submitit.SlurmExecutor(folder=folder)
        except RuntimeError as e:
            raise PabError(f"cannot submit to SLURM from here: {e}") from None
        try:
            ex.update_parameters(**slurm_parameters(grid, opts))
        except ValueError as e:
            raise PabError(f"slurm options are not usable: {e}") from None
    elif cluster == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=opts.minutes(), gpus_per_node=opts.gpus_per_node or 0)
    elif cluster == "debug":
        ex = submitit.DebugExecutor(folder=folder)
    else:
        raise PabError(f"unknown submitit cluster {cluster!r}: use slurm, local or debug")
    return ex


def _run_submitit(grid: Grid, queue: list[Run], force: bool, record, cluster: str, wait: bool) -> list[str]:
    submitit = _submitit()
    ex = make_submitit_executor(grid, cluster)
    jobs = []
    with ex.batch():  # one array job on SLURM
        for run in queue:
            jobs.append((run, ex.submit(run_one, _payload(grid, run, force, None))))
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


# --------------------------------------------------------------------------- results
def _row(grid: Grid, run: Run, rec: dict) -> dict:
    ran = sum(1 for s in rec.get("stages", []) if not s["reused"])
    reused = sum(1 for s in rec.get("stages", []) if s["reused"])
    return {
        "run": run.index,
        **{k: run.varied[k] for k in grid.varied_keys},
        "status": rec["status"],
        "val_acc": rec.get("val_acc"),
        "density": rec.get("density"),
        "time_s": rec.get("time_s"),
        "stages_ran": ran,
        "stages_reused": reused,
        "error": rec.get("error"),
        "stages": {s["stage"]: s["dir"] for s in rec.get("stages", [])},
    }


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def over_seeds(varied: list[str], rows: list[dict]) -> list[dict]:
    """Mean and standard deviation (sample, n-1) of the ok runs' val_acc and density, over the
    seeds of every combination of the other varied keys."""
    others = [k for k in varied if k != "seed"]
    groups: dict[str, dict] = {}
    for r in rows:
        gkey = json.dumps([r.get(k) for k in others], sort_keys=True)
        g = groups.setdefault(gkey, {**{k: r.get(k) for k in others}, "_rows": []})
        g["_rows"].append(r)
    out = []
    for g in groups.values():
        rs = g.pop("_rows")
        ok = [r for r in rs if r["status"] == "ok"]
        row = dict(g)
        row["seeds"] = len(rs)
        row["ok"] = len(ok)
        for m in ("val_acc", "density"):
            mean, std = _mean_std([r[m] for r in ok if r.get(m) is not None])
            row[f"{m}_mean"], row[f"{m}_std"] = mean, std
        out.append(row)
    return out


def write_results(grid: Grid, records: dict[int, dict]) -> dict:
    """results.json and results.csv in the grid directory, rewritten atomically."""
    from . import artifacts

    by_index = {r.index: r for r in grid.runs}
    rows = [_row(grid, by_index[i], records[i]) for i in sorted(records)]
    varied = grid.varied_keys
    total_ran = sum(r["stages_ran"] for r in rows)
    total_reused = sum(r["stages_reused"] for r in rows)
    results = {
        "grid": grid.name,
        "grid_file": str(grid.path.resolve()),
        "base": str(grid.base.resolve()),
        "varied": varied,
        "runs_total": len(grid.runs),
        "summary": {
            "runs": len(rows),
            "ok": sum(r["status"] == "ok" for r in rows),
            "failed": sum(r["status"] != "ok" for r in rows),
            "stages_ran": total_ran,
            "stages_reused": total_reused,
        },
        "rows": rows,
        "over_seeds": over_seeds(varied, rows) if "seed" in varied else [],
    }
    grid.dir.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write_text(grid.dir / RESULTS_JSON, json.dumps(results, indent=2, allow_nan=False) + "\n")
    buf = io.StringIO()
    cols = ["run", *varied, "status", "val_acc", "density", "time_s", "stages_ran", "stages_reused", "error"]
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r.get(c) is None else (json.dumps(r[c]) if isinstance(r[c], (list, dict)) else r[c]) for c in cols])
    artifacts.atomic_write_text(grid.dir / RESULTS_CSV, buf.getvalue())
    return results


def load_results(path: str | Path) -> dict:
    """results.json from a grid directory (or the file itself)."""
    p = Path(path)
    f = p / RESULTS_JSON if p.is_dir() else p
    if not f.is_file():
        raise PabError(f"{path}: no {RESULTS_JSON} here (give the grid directory, <output_dir>/<grid name>/, that `pab grid` wrote)")
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise PabError(f"{f}: not a readable results file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not isinstance(data.get("varied"), list):
        raise PabError(f"{f}: not a pab grid results file")
    return data
