"""runtime.loggers: the csv and TensorBoard trackers (pab.loggers plugins) get the same scalars as
metrics.jsonl; a logger named without its package, or unknown, is refused at validation."""
from __future__ import annotations

import csv
import json
import math
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TINY_SPEC


def _run(tmp_path, loggers: str):
    from pab_framework.pipeline import run_spec
    from pab_framework.specification import load_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY_SPEC.replace("progress: plain", f"progress: none, loggers: {loggers}"))
    return {o.stage_id: o.dir for o in run_spec(load_spec(spec))}["train"]


def _scalars(row):
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def test_default_is_jsonl_only(write_spec):
    from pab_framework.specification import load_spec

    assert load_spec(write_spec(TINY_SPEC)).runtime.loggers == ["jsonl"]


def test_csv_and_tensorboard_match_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d = _run(tmp_path, "[jsonl, csv, tensorboard]")
    metrics = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and "flips" in metrics[0]
    with open(d / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(metrics)
    for m, r in zip(metrics, rows):
        assert set(r) == set(_scalars(m))
        for k, v in _scalars(m).items():
            assert math.isclose(float(r[k]), v, rel_tol=1e-12), k

    acc = EventAccumulator(str(d / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == set(_scalars(metrics[0])) - {"epoch"}
    for k in ("val_acc", "train_loss", "flips"):
        events = acc.Scalars(k)
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([m[k] for m in metrics], rel=1e-6)


def test_tensorboard_missing_is_one_clear_message(write_spec, monkeypatch):
    from pab_framework.errors import PabError, install_command
    from pab_framework.tracking import TrackedRun
    from pab_plugins.loggers.files import TensorBoard

    # as if the tensorboard extra were not installed
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    path = write_spec(TINY_SPEC.replace("progress: plain", "progress: plain, loggers: [jsonl, tensorboard]"))
    from pab_framework.cli import app

    r = CliRunner().invoke(app, ["validate", str(path)])
    assert r.exit_code == 2
    assert "runtime.loggers" in r.output and install_command("tensorboard") in r.output.replace("\n", "")
    assert f"{path}:14" in r.output  # the line of the runtime section
    assert "Traceback" not in r.output
    run = TrackedRun("train", "tiny", None, write_spec("", "x").parent, "train", "train", "k" * 64, 0, 2, {}, {}, {})
    with pytest.raises(PabError, match=re.escape(install_command("tensorboard"))):  # (what its tracker thread would warn of, had it gone away after validation)
        TensorBoard().start(TensorBoard.Params(), None, run)


def test_unknown_logger_is_rejected(write_spec):
    from pab_framework.cli import app

    path = write_spec(TINY_SPEC.replace("progress: plain", "progress: plain, loggers: [wandbb]"))
    r = CliRunner().invoke(app, ["validate", str(path)])
    assert r.exit_code == 2 and "runtime.loggers[0]" in r.output
    assert "unknown logger 'wandbb'; did you mean 'wandb'?" in r.output and f"{path}:14" in r.output


def test_the_install_command_names_the_source_folder_of_a_clone_and_the_package_of_a_wheel(monkeypatch):
    from pab_framework import errors

    root = Path(errors.__file__).resolve().parents[1]
    assert errors.install_command("mlflow") == f"pip install -e '{root}[mlflow]'"  # the tests run from a clone
    monkeypatch.setattr(errors, "__file__", "/site-packages/pab_framework/errors.py")  # as installed from a wheel
    assert errors.install_command("mlflow") == "pip install 'pab[mlflow]'"
