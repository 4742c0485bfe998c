"""Crash-exact resume: real `pab run` subprocesses killed with SIGKILL at chosen points (mid-epoch,
inside a checkpoint write, between the checkpoint renames, after an epoch's metrics), then resumed;
the final weights must be bit-identical to an uninterrupted run and metrics.jsonl the same. The
points are reached through tests/hooks (PAB_TEST_PAUSE in a subprocess, `pab_faults.at` here)."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pab_faults
from conftest import ROOT, with_hooks

# 12 steps per epoch (1438 training digits / 128), a checkpoint every 4 steps and every epoch
SPEC = """\
name: resume
seed: 3
model: {name: mlp, hidden: [32], init: kaiming_normal}
data: {name: digits, batch_size: 128}
stages:
  prune:
    kind: prune
    pruner: {name: random, density: 0.5}
  train:
    kind: train
    after: [prune]
    epochs: 3
    checkpoint_every_steps: 4
    optimizer: {name: bop, ar: 1.0e-3, tau: 1.0e-6, rest: {name: sgd, lr: 0.05, momentum: 0.9}}
runtime: {device: cpu, output_dir: runs, progress: plain}
"""
TIMING = {"epoch_s"}  # wall-clock figures differ between any two runs


def _env(pause: str | None = None) -> dict:
    env = with_hooks({k: v for k, v in os.environ.items() if k != "PAB_TEST_PAUSE"})
    env["CI"] = "1"
    if pause:
        env["PAB_TEST_PAUSE"] = pause
    return env


def _cmd(spec: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pab_framework", "run", str(spec), *extra]


def run_to_end(spec: Path, *extra: str) -> subprocess.CompletedProcess:
    p = subprocess.run(_cmd(spec, *extra), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def run_and_kill(spec: Path, pause: str) -> str:
    """Start `pab run`, wait until it stands at `pause`, SIGKILL it; returns what it printed."""
    proc = subprocess.Popen(_cmd(spec), cwd=ROOT, env=_env(pause), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    seen = b""
    try:
        while b"PAB_TEST_PAUSED" not in seen:
            left = deadline - time.monotonic()
            assert left > 0, f"never reached {pause}: {seen.decode(errors='replace')}"
            ready, _, _ = select.select([proc.stderr, proc.stdout], [], [], left)
            for f in ready:
                chunk = os.read(f.fileno(), 65536)
                seen += chunk
            if proc.poll() is not None and b"PAB_TEST_PAUSED" not in seen:
                seen += proc.stderr.read() + proc.stdout.read()
                raise AssertionError(f"exited ({proc.returncode}) before {pause}: {seen.decode(errors='replace')}")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    return seen.decode(errors="replace")


def stage_dir(root: Path, stage: str) -> Path:
    (d,) = (root / "runs" / "resume").glob(f"{stage}-*")
    return d


def metrics(d: Path) -> list[dict]:
    lines = (d / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def assert_same_run(ref: Path, got: Path) -> None:
    a, b = stage_dir(ref, "train"), stage_dir(got, "train")
    assert a.name == b.name
    ma = torch.load(a / "model.pt", weights_only=True)
    mb = torch.load(b / "model.pt", weights_only=True)
    assert ma["state_dict"].keys() == mb["state_dict"].keys()
    for k in ma["state_dict"]:
        x, y = ma["state_dict"][k], mb["state_dict"][k]
        assert x.dtype == y.dtype and torch.equal(x, y), f"weights {k} differ after resume"
        assert x.numpy().tobytes() == y.numpy().tobytes(), f"weights {k} not bit-identical"
    for k in ma["masks"]:
        assert torch.equal(ma["masks"][k], mb["masks"][k])
    assert metrics(a) == metrics(b)
    assert [r["epoch"] for r in metrics(b)] == [1, 2, 3]
    tables = sorted(p.name for p in a.glob("*.jsonl"))
    assert "flips.jsonl" in tables and tables == sorted(p.name for p in b.glob("*.jsonl"))
    for t in tables:  # every per-layer table (Bop's flips.jsonl, ...) as well as metrics.jsonl
        assert (a / t).read_text() == (b / t).read_text() or t == "metrics.jsonl", t
    # complete: result written, checkpoints removed
    assert (b / "result.json").is_file()
    assert not list(b.glob("checkpoint*")) and not list(b.glob(".checkpoint*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ref")
    (d / "spec.yaml").write_text(SPEC)
    run_to_end(d / "spec.yaml")
    return d


def _fresh(tmp_path: Path) -> Path:
    (tmp_path / "spec.yaml").write_text(SPEC)
    return tmp_path / "spec.yaml"


def test_kill_mid_epoch_and_inside_checkpoint_write(reference, tmp_path):
    spec = _fresh(tmp_path)
    # global step 7: epoch 1, after the step-4 checkpoint; steps 5-7 are lost and redone
    run_and_kill(spec, "step:7")
    d = stage_dir(tmp_path, "train")
    assert (d / "checkpoint.pt").is_file() and not (d / "result.json").exists()
    # resumed at step 4; its 2nd save is the end of epoch 1: killed with half the temporary file written
    out = run_and_kill(spec, "ckpt-write:2")
    assert "resuming train" in out and "epoch 1, step 4/12" in out
    assert list(d.glob(".checkpoint.pt.*.tmp")), "the half-written temporary file should be there"
    # the newest checkpoint gets corrupted on disk: resume must name it and fall back to the previous one
    cur = d / "checkpoint.pt"
    data = cur.read_bytes()
    cur.write_bytes(data[: len(data) // 2])
    p = run_to_end(spec)
    text = p.stdout + p.stderr
    assert "checkpoint.pt" in text and "truncated or corrupted" in text
    assert "resuming train" in text
    assert_same_run(reference, tmp_path)


@pytest.mark.slow
def test_kill_at_every_kind_of_point(reference, tmp_path):
    spec = _fresh(tmp_path)
    run_and_kill(spec, "step:2")  # before any checkpoint: the stage starts over
    run_and_kill(spec, "step:5")  # just after the first step checkpoint
    run_and_kill(spec, "ckpt-rotate:2")  # between the renames: only checkpoint.prev.pt stands
    d = stage_dir(tmp_path, "train")
    assert (d / "checkpoint.prev.pt").is_file() and not (d / "checkpoint.pt").exists()
    run_and_kill(spec, "epoch-end:2")  # metrics of epoch 2 written, its checkpoint not yet
    run_and_kill(spec, "step:33")
    run_to_end(spec)
    assert_same_run(reference, tmp_path)


def run_in_process(spec: Path, **kw) -> str:
    """`pab run` in this process (fast); returns what it logged."""
    import io

    from rich.console import Console

    from pab_framework.pipeline import run_spec
    from pab_framework.progress import Reporter
    from pab_framework.spec import load_spec

    buf = io.StringIO()
    run_spec(load_spec(spec), reporter=Reporter(Console(file=buf, width=200), mode="plain"), **kw)
    return buf.getvalue()


def test_no_checkpoint_after_the_last_epoch_and_a_crash_there_loses_one_epoch(reference, tmp_path, monkeypatch):
    """model.pt follows the last epoch at once, so no checkpoint is written there; a crash before
    model.pt is complete resumes from the epoch before and ends as an uninterrupted run."""
    from pab_framework.checkpointing import Checkpointer
    from pab_framework.context import StageContext

    spec = _fresh(tmp_path)
    saved = []
    real_save = Checkpointer.save

    def save(self, trainer):
        saved.append((trainer.epoch, trainer.step))
        real_save(self, trainer)

    def crash(self, *a, **k):
        if self.stage_id == "train":
            raise RuntimeError("simulated crash while model.pt is written")
        return real_model(self, *a, **k)

    real_model = StageContext.save_model
    monkeypatch.setattr(Checkpointer, "save", save)
    monkeypatch.setattr(StageContext, "save_model", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_in_process(spec)
    # every 4 steps within an epoch, every epoch's end but the last
    assert saved == [(0, 4), (0, 8), (1, 0), (1, 4), (1, 8), (2, 0), (2, 4), (2, 8)]
    d = stage_dir(tmp_path, "train")
    assert not (d / "model.pt").exists() and not (d / "result.json").exists()
    monkeypatch.setattr(StageContext, "save_model", real_model)
    log = run_in_process(spec)
    assert "at epoch 3, step 8/12" in log
    assert_same_run(reference, tmp_path)


def test_sigterm_checkpoints_and_exits_3_then_resumes(tmp_path):
    spec = _fresh(tmp_path)
    proc = subprocess.Popen(_cmd(spec), cwd=ROOT, env=_env(None), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # once epoch 1 is done, SIGTERM (what SLURM sends): a checkpoint at the next step boundary, exit 3
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch 1/3"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    proc.stdout.close()
    rc = proc.wait(60)
    text = "".join(lines) + rest
    assert rc == 3, text
    assert "stopped: SIGTERM at" in text and "Run the same command again to resume" in text
    assert "Traceback" not in text and "error" not in text  # a planned stop, exit 3, is not an error
    d = stage_dir(tmp_path, "train")
    assert (d / "checkpoint.pt").is_file() and not (d / "result.json").exists()
    assert [r["epoch"] for r in metrics(d)] in ([1], [1, 2])
    log = run_in_process(spec)
    assert "resuming train (train) from" in log
    assert [r["epoch"] for r in metrics(d)] == [1, 2, 3]
    assert (d / "result.json").is_file() and not (d / "checkpoint.pt").exists()


def _cli(*args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from pab_framework.cli import app

    r = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    return r.exit_code, r.output + (r.stderr if r.stderr_bytes is not None else "")


def _table_row(out: str, stage: str) -> list[str]:
    """The cells of `stage`'s row in a rich results table."""
    (line,) = [l for l in out.splitlines() if l.startswith(f"│ {stage} ")]
    return [c.strip() for c in line.strip("│").split("│")]


def test_resumed_stage_says_so_once_and_its_times_add_up(tmp_path, monkeypatch):
    """After a SIGINT at the end of epoch 1: `stopped:` (exit 3); the next run prints one line
    about the resume, calls the stage `resumed`, and writes compute_s = its wall_s + the time of
    the interrupted session (as the checkpoint recorded it); a third run reuses both stages and
    shows no time for them; `pab results` of the experiment directory lists them."""
    from pab_framework import artifacts, checkpoint

    spec = _fresh(tmp_path)
    pab_faults.at("epoch-end", 1, lambda trainer: os.kill(os.getpid(), signal.SIGINT), monkeypatch.setattr)
    code, out = _cli("run", str(spec))
    monkeypatch.undo()
    assert code == 3, out
    assert "stopped: SIGINT at the end of epoch 1; checkpoint written to" in out and "error" not in out
    d = stage_dir(tmp_path, "train")
    earlier = checkpoint.load(d, None)[0]["elapsed"]
    assert earlier > 0

    code, out = _cli("run", str(spec))
    assert code == 0, out
    said = [l for l in out.splitlines() if "checkpoint" in l or "resuming" in l]
    assert len(said) == 1 and said[0].startswith("resuming train (train) from "), out  # one line, not two
    assert "at epoch 2, step 0/12 (--restart starts it afresh)" in out
    assert _table_row(out, "prune")[2] == "reused" and _table_row(out, "prune")[5] == "-"
    row = _table_row(out, "train")
    r = artifacts.read_json(d / "result.json")
    assert row[2] == "resumed" and row[5] == f"{r['wall_s']:.1f}"
    assert r["resumed"] is True and "train_s" not in r
    assert abs(r["compute_s"] - (r["wall_s"] + earlier)) < 2e-3
    assert artifacts.read_json(stage_dir(tmp_path, "prune") / "result.json")["compute_s"] == \
        artifacts.read_json(stage_dir(tmp_path, "prune") / "result.json")["wall_s"]

    code, out = _cli("run", str(spec))
    assert code == 0, out
    assert [_table_row(out, s)[2::3] for s in ("prune", "train")] == [["reused", "-"], ["reused", "-"]]

    code, out = _cli("results", str(tmp_path / "runs" / "resume"))
    assert code == 0, out
    assert "compute (s)" in out and "resume: stages" in out
    row = _table_row(out, "train")
    assert row[2] == "complete, resumed" and row[5] == f"{r['compute_s']:.1f}" and row[4] == f"{r['val_acc']:.4f}"
    assert _table_row(out, "prune")[2] == "complete"
    code, one = _cli("results", str(d))  # one stage directory
    assert code == 0 and _table_row(one, "train")[2] == "complete, resumed"


def test_results_of_an_experiment_with_an_interrupted_stage(tmp_path, monkeypatch):
    from pab_framework.errors import PabError

    spec = _fresh(tmp_path)

    def crash(trainer):
        raise PabError("simulated crash")

    pab_faults.at("step", 17, crash, monkeypatch.setattr)
    code, out = _cli("run", str(spec))
    assert code == 2 and "simulated crash" in out
    code, out = _cli("results", str(tmp_path / "runs" / "resume"))
    assert code == 0, out
    assert _table_row(out, "train")[2:] [:4] == ["interrupted", "-", "-", "-"]
    assert "1 complete, 1 interrupted; an interrupted stage resumes" in out
    code, out = _cli("results", str(tmp_path))
    assert code == 2 and "no stage directories" in out and "experiment directory" in out


def test_restart_throws_the_checkpoint_away(tmp_path, monkeypatch):
    from pab_framework import checkpoint
    from pab_framework.errors import PabError

    spec = _fresh(tmp_path)

    def crash(trainer):
        raise PabError("simulated crash")

    pab_faults.at("step", 17, crash, monkeypatch.setattr)
    with pytest.raises(PabError, match="simulated crash"):
        run_in_process(spec)
    monkeypatch.undo()
    d = stage_dir(tmp_path, "train")
    assert checkpoint.exists(d) and [r["epoch"] for r in metrics(d)] == [1]
    (tmp_path / "runs" / "keep.txt").write_text("mine")
    log = run_in_process(spec, restart=True)
    assert "threw away the checkpoint of train" in log
    assert "resuming train" not in log  # the stage itself started from epoch 1
    assert [r["epoch"] for r in metrics(d)] == [1, 2, 3]
    assert (tmp_path / "runs" / "keep.txt").read_text() == "mine"  # the output dir is never wiped
