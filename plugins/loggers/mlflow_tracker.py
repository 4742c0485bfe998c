"""`mlflow`: every training stage an MLflow run, in the experiment of its spec (or of its grid, so
that MLflow's compare view is the grid's table): the resolved spec as params, the stage's identity
and grid axes as tags, every metrics.jsonl figure and per-layer figure as a metric history at
step = epoch, spec.yaml, model.pt and result.json as artifacts, and the status the stage ended with.
Needs `pip install 'pab[mlflow]'` (MLflow's client with its SQL store; its UI is the full
`mlflow` package)."""
from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from pab_framework.tracking import needs_package

# what MLflow accepts in a param, tag or metric name; anything else becomes "_"
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. :/]")
_PARAM_TEXT = 500  # a param's value at most (older MLflow servers refuse longer ones)
_BATCH = {"params": 100, "metrics": 1000}  # what one log_batch request may carry


def _key(name: str) -> str:
    return _UNSAFE.sub("_", name)[:250]


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _uri(uri: str, base_dir: Path) -> str:
    """`uri` with a relative SQLite file or store folder taken relative to the spec file; a
    SQLite file's folder is made, as SQLite does not make it."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):]).expanduser()
        path = path if path.is_absolute() else (base_dir / path).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    if "://" not in uri:  # a local directory (MLflow's file store)
        path = Path(uri).expanduser()
        return str(path if path.is_absolute() else (base_dir / path).resolve())
    return uri


@dataclass
class _Conn:
    client: Any  # an MlflowClient
    experiment_id: str


@dataclass
class _Run:
    client: Any
    run_id: str


class MLflow:
    """MLflow: each training stage a run (the spec as params, the figures as metric histories, the files as artifacts).

    Runs go into the experiment named after the grid (under `pab grid`) or the spec. Default
    store: MLFLOW_TRACKING_URI when set, else `sqlite:///<output_dir>/mlflow.db` with artifacts in
    `<output_dir>/mlartifacts`; see them with `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        tracking_uri: Optional[str] = Field(
            None, min_length=1, description="Where runs go: sqlite:///file.db, a local directory, or a tracking server's URL. "
            "Default: MLFLOW_TRACKING_URI when set, else sqlite:///<runtime.output_dir>/mlflow.db. A relative path is relative to the spec file.")
        experiment: Optional[str] = Field(None, min_length=1, description="The MLflow experiment (default: the grid's name under pab grid, else the spec's).")
        artifact_location: Optional[str] = Field(
            None, min_length=1, description="Where a new experiment keeps its artifacts (default: beside a SQLite file, its folder's "
            "mlartifacts/; else the store's or the server's own).")

    def spec_problems(self, params, spec) -> list:
        return needs_package("mlflow", "mlflow")

    def connect(self, params, scope) -> _Conn:
        import logging

        from mlflow.tracking import MlflowClient  # optional: the mlflow extra (a second or two to import: on the tracker's thread)

        for name in ("mlflow", "alembic"):  # not the store's set-up chatter on pab's output
            logging.getLogger(name).setLevel(logging.WARNING)
        uri = _uri(params.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{scope.output_dir / 'mlflow.db'}",
                   scope.base_dir)
        db = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
        location = params.artifact_location or ((db.parent / "mlartifacts").as_uri() if db is not None else None)
        with _one_at_a_time(db):
            client = MlflowClient(tracking_uri=uri)
            return _Conn(client, _experiment(client, params.experiment or scope.experiment, location))

    def start(self, params, conn: _Conn, run) -> _Run:
        from mlflow.entities import Param  # optional: the mlflow extra

        c = conn.client
        if run.resume_id:  # the stage resumes: its run goes on
            c.update_run(run.resume_id, status="RUNNING")
            return _Run(c, run.resume_id)
        rid = c.create_run(conn.experiment_id, run_name=run.name, tags={_key(k): v for k, v in run.tags.items()}).info.run_id
        values = [Param(_key(k), v[:_PARAM_TEXT]) for k, v in run.params.items()]
        for chunk in _chunks(values, _BATCH["params"]):
            c.log_batch(rid, params=chunk)
        return _Run(c, rid)

    def log_epochs(self, params, handle: _Run, epochs: list) -> None:
        from mlflow.entities import Metric  # optional: the mlflow extra

        now = int(time.time() * 1000)
        metrics = [Metric(_key(k), float(v), now, e.epoch) for e in epochs for k, v in e.scalars.items()]
        metrics += [Metric(_key(f"{t}/{layer}/{k}"), float(v), now, e.epoch)
                    for e in epochs for t, rows in e.layers.items() for layer, cols in rows.items() for k, v in cols.items()]
        for chunk in _chunks(metrics, _BATCH["metrics"]):
            handle.client.log_batch(handle.run_id, metrics=chunk)

    def log_artifacts(self, params, handle: _Run, files: list) -> None:
        for f in files:
            handle.client.log_artifact(handle.run_id, str(f))

    def finish(self, params, handle: _Run, status: str) -> None:
        handle.client.set_terminated(handle.run_id, status=status)

    def run_id(self, params, handle: _Run) -> str:
        return handle.run_id


@contextmanager
def _one_at_a_time(db: Path | None):
    """Around opening a SQLite store: one process at a time (the runs of a grid may open a new
    store at the same moment, and each would set up its tables). An advisory lock on `<db>.lock`."""
    try:
        import fcntl  # POSIX: elsewhere, no lock
    except ImportError:  # pragma: no cover
        fcntl = None
    if db is None or fcntl is None:
        yield
        return
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _experiment(client, name: str, location: str | None) -> str:
    """The id of experiment `name`, made when there is none (another run of a grid may make it at the same moment)."""
    from mlflow.exceptions import MlflowException  # optional: the mlflow extra

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage != "active":
        raise RuntimeError(f"the MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore) or name another (experiment:)")
    return found.experiment_id
