"""Trackers (runtime.loggers, `pab.loggers` plugins) against the real packages: MLflow read back
from a SQLite store in the test's folder with MlflowClient, Weights & Biases read back from an
offline run's files. A grid is one experiment; a resumed stage continues its tracker run and no
epoch is sent twice; a tracker that fails, hangs or is unreachable costs the run nothing."""
from __future__ import annotations

import io
import json
import struct
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from pydantic import BaseModel
from rich.console import Console
from typer.testing import CliRunner

import pab_faults
from conftest import TINY_SPEC
from pab_framework import artifacts
from pab_framework import registry as R
from pab_framework.errors import TrainingError
from pab_framework.pipeline import run_spec
from pab_framework.progress import Reporter
from pab_framework.specification import load_spec
from pab_framework.tracking import flat_params, numbers


def _spec(tmp_path: Path, loggers: str, epochs: int = 2) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(TINY_SPEC.replace("progress: plain", f"progress: none, loggers: {loggers}").replace("epochs: 2", f"epochs: {epochs}"))
    return p


def _reporter() -> tuple[Reporter, io.StringIO]:
    buf = io.StringIO()
    return Reporter(Console(file=buf, width=400, soft_wrap=True), mode="plain"), buf


def _train_dir(tmp_path: Path) -> Path:
    (d,) = (tmp_path / "runs" / "tiny").glob("train-*")
    return d


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# --------------------------------------------------------------------------- MLflow
def test_mlflow_holds_the_stage_spec_figures_files_and_status(tmp_path):
    # a relative SQLite file is relative to the spec file, as every path in a spec
    spec = _spec(tmp_path, "[jsonl, {name: mlflow, tracking_uri: 'sqlite:///tracking/mlflow.db'}]")
    run_spec(load_spec(spec))
    d = _train_dir(tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")  # the spec's name
    (run,) = client.search_runs([exp.experiment_id])  # the train stage; the prune stage does not train
    rid = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == f"train-{d.name.split('-')[1]}"
    doc = yaml.safe_load((d / "spec.yaml").read_text())
    tags = run.data.tags
    assert (tags["pab.stage"], tags["pab.kind"], tags["pab.key"], tags["pab.seed"]) == ("train", "train", doc["key"], "0")
    # the resolved spec as params, key paths flattened
    params = run.data.params
    assert params == flat_params(doc["spec"])
    assert params["stages.train.epochs"] == "2" and params["model.hidden"] == "[32]" and params["stages.train.optimizer.name"] == "bop"
    assert params["stages.prune.pruner.density"] == "0.3" and params["runtime.device"] == "cpu"
    # every figure of metrics.jsonl as a history at step = epoch
    rows = artifacts.read_jsonl(d / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2] and "flips" in rows[0]
    for k in numbers(rows[0]):
        assert _history(client, rid, k) == [(r["epoch"], pytest.approx(float(r[k]), rel=1e-12)) for r in rows], k
    # the per-layer figures (Bop's flips.jsonl) as <table>/<layer>/<column>
    lines = artifacts.read_jsonl(d / "flips.jsonl")
    assert lines
    for line in lines:
        for col, v in line.items():
            if col not in ("epoch", "layer"):
                assert (line["epoch"], pytest.approx(float(v))) in _history(client, rid, f"flips/{line['layer']}/{col}")
    # the stage's files as artifacts, byte for byte; the new experiment's artifacts beside the store
    assert sorted(a.path for a in client.list_artifacts(rid)) == ["model.pt", "result.json", "spec.yaml"]
    for name in ("model.pt", "result.json"):
        got = client.download_artifacts(rid, name, str(tmp_path / "dl"))
        assert Path(got).read_bytes() == (d / name).read_bytes(), name
    assert exp.artifact_location == (tmp_path / "tracking" / "mlartifacts").as_uri()
    assert artifacts.read_json(d / "trackers.json") == {"mlflow": {"name": "mlflow", "run_id": rid, "through": 2}}


def test_mlflow_store_by_default_beside_the_runs_or_where_mlflow_tracking_uri_says(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = _spec(tmp_path, "[mlflow]", epochs=1)
    run_spec(load_spec(spec))
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")  # runtime.output_dir's
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.artifact_uri.startswith((tmp_path / "runs" / "mlartifacts").as_uri())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    run_spec(load_spec(spec), force=True)
    client = MlflowClient(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FINISHED"


def test_a_stopped_then_failed_stage_resumes_its_mlflow_run_with_no_epoch_twice(tmp_path, monkeypatch):
    db = tmp_path / "m.db"
    spec = _spec(tmp_path, f"[{{name: mlflow, tracking_uri: 'sqlite:///{db}'}}]", epochs=3)
    client = MlflowClient(f"sqlite:///{db}")

    def the_run():
        (r,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
        return r

    # SIGTERM's stop at epoch 2, step 3 (12 steps an epoch): KILLED, epoch 1 in the tracker
    pab_faults.at("step", 15, lambda trainer: trainer.request_stop("SIGTERM"), patch=monkeypatch.setattr)
    with pytest.raises(Exception, match="SIGTERM at epoch 2, step 3"):
        run_spec(load_spec(spec))
    monkeypatch.undo()
    first = the_run()
    assert first.info.status == "KILLED" and [s for s, _ in _history(client, first.info.run_id, "val_acc")] == [1]
    # resumed, then failing once epoch 2's figures are out but before its checkpoint: FAILED, epochs 1-2
    pab_faults.at("epoch-end", 2, pab_faults.fail(0, "epoch-end", 2, False), patch=monkeypatch.setattr)
    with pytest.raises(TrainingError, match="PAB_TEST_FAIL"):
        run_spec(load_spec(spec))
    monkeypatch.undo()
    again = the_run()
    assert again.info.run_id == first.info.run_id and again.info.status == "FAILED"
    assert [s for s, _ in _history(client, first.info.run_id, "val_acc")] == [1, 2]
    # resumed from epoch 1's checkpoint: epoch 2 is computed again but not sent again
    outcomes = {o.stage_id: o for o in run_spec(load_spec(spec))}
    assert outcomes["train"].resumed
    done = the_run()  # still the one run
    assert done.info.run_id == first.info.run_id and done.info.status == "FINISHED"
    rows = artifacts.read_jsonl(outcomes["train"].dir / "metrics.jsonl")
    for k in ("val_acc", "train_loss", "flips"):
        assert _history(client, done.info.run_id, k) == [(r["epoch"], pytest.approx(float(r[k]))) for r in rows], k
    assert [a.path for a in client.list_artifacts(done.info.run_id)] == ["model.pt", "result.json", "spec.yaml"]


def test_a_grid_is_one_experiment_its_runs_tagged_with_their_axes(tmp_path):
    from pab_framework import grid as G

    db = tmp_path / "m.db"
    _spec(tmp_path, f"[jsonl, {{name: mlflow, tracking_uri: 'sqlite:///{db}'}}]")
    (tmp_path / "ablation.yaml").write_text("base: spec.yaml\ngrid:\n  stages.train.optimizer.ar: [1.0e-3, 1.0e-2]\nset: {stages.train.epochs: 1}\n")
    g = G.load_grid(tmp_path / "ablation.yaml")
    out = G.run_grid(g, workers=2)  # two processes write the one store at once
    assert not out.failed, out.records
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("ablation")  # the grid's name, not the spec's
    assert client.get_experiment_by_name("tiny") is None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)  # one per train stage; the shared prune stage is no run
    by_ar = {r.data.tags["stages.train.optimizer.ar"]: r for r in runs}
    assert set(by_ar) == {"0.001", "0.01"}
    for ar, r in by_ar.items():
        assert r.data.tags["pab.grid"] == "ablation" and r.data.params["stages.train.optimizer.ar"] == ar
        assert r.info.run_name == f"train ar={float(ar):g}"
    G.run_grid(g, workers=1)  # every stage reused: nothing logged again
    assert len(client.search_runs([exp.experiment_id])) == 2


# --------------------------------------------------------------------------- Weights & Biases
def _wandb_records(path: Path):
    """The records of an offline W&B run file: a 7-byte header (":W&B", magic, version), then
    LevelDB-log framing (32 KiB blocks; 7-byte chunk headers: checksum, length, type) around
    protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL or FIRST start a record; MIDDLE, LAST continue it
        if kind in (1, 4) and buf:
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def _wandb_run_file(path: Path, timeout: float = 60) -> list:
    """The records of a finished offline run: W&B's service process writes the file on its own
    time, so it is read until it holds the run's end (its `exit` record)."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(_wandb_records(path)) if path.is_file() else []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def test_wandb_offline_run_holds_what_mlflow_does(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = _spec(tmp_path, "[jsonl, {name: wandb, mode: offline, project: pab-test}]")
    run_spec(load_spec(spec))
    d = _train_dir(tmp_path)
    rid = artifacts.read_json(d / "trackers.json")["wandb"]["run_id"]
    (rundir,) = (tmp_path / "runs" / "wandb").glob(f"offline-run-*-{rid}")  # W&B's files under runtime.output_dir
    records = _wandb_run_file(rundir / f"run-{rid}.wandb")
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    doc = yaml.safe_load((d / "spec.yaml").read_text())
    assert (run.project, run.run_group, run.job_type, run.display_name) == ("pab-test", "tiny", "train", f"train-{doc['key'][:12]}")
    assert {"pab.stage=train", "pab.kind=train", "pab.seed=0"} <= set(run.tags)
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    config.update({u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "config" for u in r.config.update})
    assert {k: config[k] for k in flat_params(doc["spec"])} == flat_params(doc["spec"]) and config["pab.key"] == doc["key"]
    history: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(row["_step"], {}).update(row)
    rows = artifacts.read_jsonl(d / "metrics.jsonl")
    assert sorted(history) == [1, 2]
    for row in rows:
        for k, v in numbers(row).items():
            assert history[row["epoch"]][k] == pytest.approx(v, rel=1e-12), k
    for line in artifacts.read_jsonl(d / "flips.jsonl"):
        assert history[line["epoch"]][f"flips/{line['layer']}/flips"] == line["flips"]
    saved = {f.path for r in records if r.WhichOneof("record_type") == "files" for f in r.files.files}
    assert saved == {"spec.yaml", "model.pt", "result.json"}
    for name in saved:
        assert (rundir / "files" / name).read_bytes() == (d / name).read_bytes(), name
    summary = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "summary" for u in r.summary.update if u.key}
    assert summary["pab.status"] == "FINISHED"
    (ended,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert ended.exit_code == 0


# --------------------------------------------------------------------------- a tracker never costs a run
class _Params(BaseModel):
    pass


class _Fails:
    """A tracker that is down from its first epoch."""

    Params = _Params
    calls: list = []

    def start(self, params, conn, run):
        return None

    def log_epochs(self, params, handle, epochs):
        self.calls.append([e.epoch for e in epochs])
        raise ConnectionError("tracker down")


class _Hangs:
    """A tracker whose first epoch never returns (until the test lets it go)."""

    Params = _Params
    release = threading.Event()

    def start(self, params, conn, run):
        return None

    def log_epochs(self, params, handle, epochs):
        self.release.wait(120)


class _Refuses:
    """A tracker that cannot be reached."""

    Params = _Params

    def connect(self, params, scope):
        raise PermissionError("no token")

    def start(self, params, conn, run):  # never called: it is left out after connect
        raise AssertionError("started after its connect failed")

    def log_epochs(self, params, handle, epochs):
        raise AssertionError("logged to after its connect failed")


class _Records:
    """A tracker that keeps what it gets, in memory (the handle is its own list)."""

    Params = _Params

    def start(self, params, conn, run):
        return {"run": run, "sent": [], "status": None}

    def log_epochs(self, params, handle, epochs):
        handle["sent"].append(list(epochs))

    def finish(self, params, handle, status):
        handle["status"] = status
        _Records.runs.append(handle)

    runs: list = []


@pytest.fixture
def test_trackers(monkeypatch):
    entries, _ = R.registry()._load("pab.loggers")  # noqa: SLF001 - test-only trackers beside the installed ones
    _Records.runs.clear()
    for name, cls in (("fails_test", _Fails), ("hangs_test", _Hangs), ("refuses_test", _Refuses), ("records_test", _Records)):
        monkeypatch.setitem(entries, name, R.Entry(name, "pab.loggers", f"tests:{cls.__name__}", cls()))
    _Fails.calls.clear()
    _Hangs.release.clear()
    yield
    _Hangs.release.set()


def test_a_tracker_that_fails_hangs_or_is_unreachable_costs_the_run_nothing(tmp_path, monkeypatch, test_trackers):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # not logged in to W&B
    # a server that is not there (nothing listens on the discard port here), W&B online without
    # credentials, beside three test trackers
    spec = _spec(tmp_path, "[jsonl, fails_test, {name: hangs_test, wait_s: 0.5}, refuses_test, "
                           "{name: mlflow, tracking_uri: 'http://127.0.0.1:9', wait_s: 20}, {name: wandb, mode: online}]", epochs=3)
    reporter, out = _reporter()
    outcomes = {o.stage_id: o for o in run_spec(load_spec(spec), reporter=reporter)}
    d = outcomes["train"].dir
    assert (d / "result.json").is_file() and [r["epoch"] for r in artifacts.read_jsonl(d / "metrics.jsonl")] == [1, 2, 3]
    text = out.getvalue()
    warnings = [line for line in text.splitlines() if line.startswith("warning: tracker")]
    assert len(warnings) == 5, text  # one each, however many epochs and stages followed
    assert any("fails_test (runtime.loggers[1]): logging epoch 1 failed (ConnectionError: tracker down)" in w for w in warnings)
    assert any("hangs_test (runtime.loggers[2]): still logging after 0.5 s" in w for w in warnings)
    assert any("refuses_test (runtime.loggers[3]): connecting failed (PermissionError: no token)" in w for w in warnings)
    assert any("mlflow (runtime.loggers[4]): connecting failed" in w for w in warnings)
    assert any("wandb (runtime.loggers[5]): connecting failed (RuntimeError: not logged in to W&B: run `wandb login`" in w for w in warnings)
    assert all("metrics.jsonl keeps every figure" in w for w in warnings)
    assert _Fails.calls == [[1]]  # left out after its first error


def test_epochs_that_end_within_every_s_go_together(tmp_path, test_trackers):
    spec = _spec(tmp_path, "[{name: records_test, every_s: 0}, {name: records_test, every_s: 600}]", epochs=3)
    run_spec(load_spec(spec))
    each, held = sorted(_Records.runs, key=lambda h: -len(h["sent"]))  # (the two threads finish in either order)
    assert [[e.epoch for e in batch] for batch in each["sent"]] == [[1], [2], [3]]
    assert [[e.epoch for e in batch] for batch in held["sent"]] == [[1], [2, 3]]  # the first at once; the rest at the stage's end
    assert each["status"] == held["status"] == "FINISHED"
    d = _train_dir(tmp_path)
    rows, flips = artifacts.read_jsonl(d / "metrics.jsonl"), artifacts.read_jsonl(d / "flips.jsonl")
    for batch in held["sent"]:
        for e in batch:
            assert e.scalars == numbers(rows[e.epoch - 1])
            assert e.layers["flips"] == {f["layer"]: {k: v for k, v in f.items() if k not in ("epoch", "layer")} for f in flips if f["epoch"] == e.epoch}
    assert held["run"].tags["pab.kind"] == "train" and held["run"].epochs == 3 and held["run"].resume_id is None
    assert artifacts.read_json(d / "trackers.json") == {"records_test": {"name": "records_test", "run_id": None, "through": 3},
                                                         "records_test#2": {"name": "records_test", "run_id": None, "through": 3}}


def test_a_logger_without_its_package_is_refused_with_the_install_command(write_spec, monkeypatch):
    from pab_framework.cli import app
    from pab_framework.errors import install_command

    for package, line in (("mlflow", "mlflow"), ("wandb", "{name: wandb, mode: offline}")):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, package, None)  # as if the extra were not installed
            path = write_spec(TINY_SPEC.replace("progress: plain", f"progress: plain, loggers: [jsonl, {line}]"))
            r = CliRunner().invoke(app, ["validate", str(path)])
        assert r.exit_code == 2, r.output
        assert f"{path}:14" in r.output and "runtime.loggers[1]" in r.output
        assert f"needs the {package} package" in r.output and install_command(package) in r.output.replace("\n", "")
        assert "Traceback" not in r.output
    path = write_spec(TINY_SPEC.replace("progress: plain", "progress: plain, loggers: [{name: mlflow, tracking_urii: x}]"))
    r = CliRunner().invoke(app, ["validate", str(path)])
    assert r.exit_code == 2 and f"{path}:14" in r.output
    assert "runtime.loggers[0].tracking_urii: unknown key 'tracking_urii'; did you mean 'tracking_uri'" in r.output


def test_pab_plugins_lists_the_trackers():
    from pab_framework.cli import app

    r = CliRunner().invoke(app, ["plugins"], terminal_width=300)
    assert r.exit_code == 0, r.output
    rows = [line for line in r.output.splitlines() if "│ logger" in line]
    for name, target in (("csv", "pab_plugins.loggers.files:Csv"), ("tensorboard", "pab_plugins.loggers.files:TensorBoard"),
                         ("mlflow", "pab_plugins.loggers.mlflow_tracker:MLflow"), ("wandb", "pab_plugins.loggers.wandb_tracker:WandB")):
        assert any(f" {name} " in row and target in row and "ok" in row for row in rows), (name, rows)


def test_runtime_loggers_take_names_and_mappings(write_spec):
    from pab_framework.specification import LoggerCall

    s = load_spec(write_spec(TINY_SPEC.replace("progress: plain", "progress: plain, loggers: [jsonl, csv, {name: mlflow, experiment: x, wait_s: 5}]")))
    jsonl, csv_, mlf = s.runtime.loggers
    assert jsonl == "jsonl" and isinstance(csv_, LoggerCall) and csv_.name == "csv"
    assert mlf.plugin.name == "mlflow" and mlf.params.experiment == "x" and mlf.wait_s == 5
    assert s.resolved_dict()["runtime"]["loggers"][2] == {"name": "mlflow", "every_s": 10.0, "wait_s": 5.0, "tracking_uri": None,
                                                           "experiment": "x", "artifact_location": None}


def test_a_run_whose_stages_are_all_reused_says_its_trackers_get_nothing(tmp_path, write_spec):
    from pab_framework.cli import app

    path = write_spec(TINY_SPEC.replace("epochs: 2", "epochs: 1"))
    args = ["run", str(path), "--set", f"runtime.output_dir={tmp_path / 'runs'}"]
    assert CliRunner().invoke(app, args).exit_code == 0
    r = CliRunner().invoke(app, [*args, "--set", "runtime.loggers=[jsonl, csv]"])
    assert r.exit_code == 0, r.output
    assert "every stage is reused: csv gets nothing" in r.output and "--force" in r.output
    assert not list((tmp_path / "runs").rglob("metrics.csv"))  # (nothing was sent: the note is true)


def test_sigterm_outside_the_training_loop_ends_the_tracker_run_killed(tmp_path, monkeypatch, test_trackers):
    """SIGTERM after the last epoch (writing model.pt, where the loop's own handler is gone): the
    process ends with 143 as SIGTERM's default would, but through SystemExit, so the stage's tracker
    run ends KILLED instead of staying RUNNING; afterwards SIGTERM's handler is what it was."""
    import os
    import signal

    from pab_framework.context import StageContext

    real = StageContext.save_model

    def save_then_sigterm(self, *a, **k):
        real(self, *a, **k)
        if self.stage_id == "train":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(StageContext, "save_model", save_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        run_spec(load_spec(_spec(tmp_path, "[records_test]", epochs=1)))
    assert e.value.code == 128 + signal.SIGTERM
    (run,) = _Records.runs
    assert run["status"] == "KILLED" and [[x.epoch for x in b] for b in run["sent"]] == [[1]]
    assert not (_train_dir(tmp_path) / "result.json").exists()  # the stage is not complete: running again computes it
    assert signal.getsignal(signal.SIGTERM) == before
