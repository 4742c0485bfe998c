"""Nobody let in, nothing lost: hostile pickles and YAML tags refused without running, corrupted
checkpoints detected, a full disk leaves the previous checkpoint intact, non-finite losses stop or
skip, broken third-party plugins are reported while the others keep working."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import ROOT, TINY_SPEC

from pab_framework.cli import app
from pab_framework import artifacts, checkpoint
from pab_framework.errors import ArtifactError
from pab_framework.pipeline import plan
from pab_framework.spec import load_spec

DENSE = """\
name: dense
seed: 1
model: {name: mlp, hidden: [16]}
data: {name: digits, batch_size: 256}
stages:
  train:
    kind: train
    epochs: 3
    optimizer: {name: sgd, lr: 0.05}
runtime: {device: cpu, output_dir: runs, progress: plain}
"""


def cli(*args: str):
    r = CliRunner().invoke(app, list(args))
    if r.exit_code not in (0, 2, 3, 4) and r.exception is not None:
        import traceback
        traceback.print_exception(r.exception)
    return r.exit_code, r.output + (r.stderr if r.stderr_bytes is not None else "")


class Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def stage_dirs(spec_path: Path) -> dict[str, Path]:
    return {sid: d for sid, _, d, _ in plan(load_spec(spec_path))}


# --------------------------------------------------------------------------- safe loading
@pytest.mark.parametrize("framed", [False, True], ids=["raw-file", "checksummed-frame"])
def test_malicious_checkpoint_is_refused_and_never_runs(write_spec, tmp_path, framed):
    spec = write_spec(DENSE)
    d = stage_dirs(spec)["train"]
    d.mkdir(parents=True)
    marker = tmp_path / "PWNED"
    buf = __import__("io").BytesIO()
    torch.save({"model": Evil(marker)}, buf)
    body = buf.getvalue()
    if framed:  # an attacker can compute a checksum and copy the key: only weights_only stands
        key = next(k for sid, k, _, _ in plan(load_spec(spec)) if sid == "train")
        header = {"format": 1, "key": key, "sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
        body = checkpoint.MAGIC + json.dumps(header).encode() + b"\n" + body
    (d / "checkpoint.pt").write_bytes(body)
    code, out = cli("run", str(spec))
    assert code == 2, out
    assert "checkpoint.pt" in out and "Traceback" not in out
    assert ("refused" in out) if framed else ("not a pab checkpoint" in out)
    assert "--restart" in out
    assert not marker.exists()


def test_malicious_pickle_refused_by_torch_load_safe(tmp_path):
    marker = tmp_path / "PWNED"
    for name, write in (("plain.pkl", lambda p: p.write_bytes(pickle.dumps(Evil(marker)))),
                        ("zip.pt", lambda p: torch.save(Evil(marker), p))):
        p = tmp_path / name
        write(p)
        with pytest.raises(ArtifactError, match="refused"):
            artifacts.torch_load_safe(p)
    assert not marker.exists()


def test_malicious_upstream_model_is_refused(write_spec, tmp_path):
    spec = write_spec(TINY_SPEC.replace("kind: train\n    after: [prune]\n    epochs: 2\n    optimizer: {name: bop, ar: 1.0e-3, tau: 1.0e-6}",
                                        "kind: evaluate\n    after: [prune]"))
    d = stage_dirs(spec)["prune"]
    d.mkdir(parents=True)
    marker = tmp_path / "PWNED"
    torch.save({"state_dict": Evil(marker), "masks": {}}, d / "model.pt")
    (d / "result.json").write_text("{}")  # looks complete: the evaluate stage loads its model.pt
    code, out = cli("run", str(spec))
    assert code == 2, out
    assert "model.pt" in out and "refused" in out and "Traceback" not in out
    assert not marker.exists()


def test_yaml_python_tag_is_refused(write_spec, tmp_path):
    marker = tmp_path / "PWNED"
    spec = write_spec(f"name: !!python/object/apply:os.system ['touch {marker}']\n" + TINY_SPEC.split("\n", 1)[1])
    code, out = cli("validate", str(spec))
    assert code == 2 and "Python tag is refused" in out and "spec.yaml:1" in out
    assert not marker.exists()


# --------------------------------------------------------------------------- checkpoints on disk
def _payload(n):
    return {"w": torch.arange(n, dtype=torch.float32), "meta": {"epoch": n}}


def test_checkpoint_rotation_checksum_and_key(tmp_path):
    checkpoint.save(tmp_path, "k" * 64, _payload(1))
    checkpoint.save(tmp_path, "k" * 64, _payload(2))
    got, path = checkpoint.load(tmp_path, "k" * 64)
    assert path.name == "checkpoint.pt" and got["meta"]["epoch"] == 2
    assert checkpoint.decode(tmp_path / "checkpoint.prev.pt", "k" * 64)["meta"]["epoch"] == 1
    # a flipped bit in the newest: named in a warning, the previous one is used
    raw = bytearray((tmp_path / "checkpoint.pt").read_bytes())
    raw[-10] ^= 1
    (tmp_path / "checkpoint.pt").write_bytes(bytes(raw))
    warnings = []
    got, path = checkpoint.load(tmp_path, "k" * 64, warn=warnings.append)
    assert path.name == "checkpoint.prev.pt" and got["meta"]["epoch"] == 1
    assert len(warnings) == 1 and "checkpoint.pt" in warnings[0] and "checksum mismatch" in warnings[0]
    # another stage's checkpoint is not ours
    with pytest.raises(ArtifactError, match="belongs to stage key kkkkkkkkkkkk"):
        checkpoint.decode(tmp_path / "checkpoint.prev.pt", "j" * 64)
    # nothing usable at all: both named, and the way out
    (tmp_path / "checkpoint.prev.pt").write_bytes(b"")
    with pytest.raises(ArtifactError) as e:
        checkpoint.load(tmp_path, "k" * 64)
    assert "checkpoint.pt" in e.value.message and "checkpoint.prev.pt" in e.value.message and "--restart" in e.value.message


def test_rng_state_round_trip(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    checkpoint.save(tmp_path, "x", {"rng": checkpoint.rng_state()})
    a = (torch.rand(3), random.random(), np.random.rand(3))
    got, _ = checkpoint.load(tmp_path, "x")
    checkpoint.set_rng_state(got["rng"])
    b = (torch.rand(3), random.random(), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and (a[2] == b[2]).all()


def test_full_disk_keeps_previous_checkpoint(write_spec, monkeypatch):
    spec = write_spec(DENSE)
    d = stage_dirs(spec)["train"]
    real = checkpoint.write_all
    calls = {"n": 0}

    def write_all(fd, data):
        calls["n"] += 1
        if calls["n"] >= 2:  # 2nd save: a few of its bytes go to disk, then the disk is full
            os.write(fd, data[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    monkeypatch.setattr(checkpoint, "write_all", write_all)
    code, out = cli("run", str(spec))
    assert code == 4, out
    assert "no space left on device" in out and "previous checkpoint is intact" in out and "checkpoint.pt" in out
    assert "Traceback" not in out
    assert not list(d.glob(".checkpoint*.tmp"))
    got, path = checkpoint.load(d, None)
    assert path.name == "checkpoint.pt" and got["epoch"] == 1 and len(got["metrics"]) == 1
    assert not (d / "result.json").exists()
    monkeypatch.undo()
    code, out = cli("run", str(spec))  # space freed: resumes from epoch 2
    assert code == 0, out
    assert "resuming train" in out and "epoch 2, step 0" in out
    assert [r["epoch"] for r in artifacts.read_jsonl(d / "metrics.jsonl")] == [1, 2, 3]


def test_background_checkpoint_writes_what_was_snapshot(tmp_path):
    """Training goes on changing its tensors while a checkpoint is written: the file holds the
    values at the snapshot, views included."""
    w = torch.zeros(1000)
    snap = checkpoint.snapshot({"model": {"w": w}, "views": [w[:10]], "step": 3})
    writer = checkpoint.Writer()
    path = writer.submit(tmp_path, "k", snap)
    w.add_(1)  # the next steps, while the write may be in flight
    assert torch.equal(snap["model"]["w"], torch.zeros(1000)) and torch.equal(snap["views"][0], torch.zeros(10))
    writer.wait()
    got, where = checkpoint.load(tmp_path, "k")
    assert where == path and got["step"] == 3
    assert torch.equal(got["model"]["w"], torch.zeros(1000)) and torch.equal(got["views"][0], torch.zeros(10))


def test_background_checkpoint_failure_is_raised_once_by_the_next_wait(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, "k", {"step": 1})

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "write_all", full)
    writer = checkpoint.Writer()
    writer.submit(tmp_path, "k", {"step": 2})  # returns at once; the failure comes later
    with pytest.raises(checkpoint.CheckpointWriteError, match="previous checkpoint is intact"):
        writer.wait()
    writer.wait()  # reported once
    monkeypatch.undo()
    assert checkpoint.load(tmp_path, "k")[0]["step"] == 1
    assert not list(tmp_path.glob(".checkpoint*.tmp"))


def test_failed_artifact_write_is_a_clear_error(tmp_path, monkeypatch):
    from pab_framework.errors import WriteError

    (tmp_path / "a.json").write_text('{"old": 1}')

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(WriteError, match="no space left on device"):
        artifacts.atomic_write_json(tmp_path / "a.json", {"new": 2})
    monkeypatch.undo()
    assert json.loads((tmp_path / "a.json").read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


# --------------------------------------------------------------------------- non-finite losses
@pytest.fixture
def nan_at(monkeypatch):
    """Poison the inputs of one batch (epoch, batch index; 0-based) with NaN."""
    from pab_framework.data import Batches

    real_iter = Batches.__iter__

    def install(epoch: int, batch: int):
        def it(self):
            for i, (x, y) in enumerate(real_iter(self), start=self.skip):
                if self.shuffle and self.epoch == epoch and i == batch:
                    x = torch.full_like(x, float("nan"))
                yield x, y

        monkeypatch.setattr(Batches, "__iter__", it)

    return install


@pytest.mark.parametrize("every,ckpt_steps,last", [(1, None, (1, 0)), (4, None, (1, 0)), (100, None, (1, 0)), (100, 2, (1, 2))],
                         ids=["each-step", "every-4", "at-epoch-end", "before-a-mid-epoch-checkpoint"])
def test_nonfinite_loss_stops_naming_epoch_and_step(write_spec, nan_at, monkeypatch, every, ckpt_steps, last):
    # `every`: how often the flag is read on the host (every step on the CPU; every few on a GPU,
    # simulated here): the same step is named, and nothing non-finite is ever written
    import pab_framework.callbacks as callbacks

    monkeypatch.setattr(callbacks, "FINITE_CHECK_EVERY", {"cpu": every})
    text = DENSE if ckpt_steps is None else DENSE.replace("epochs: 3", f"epochs: 3\n    checkpoint_every_steps: {ckpt_steps}")
    spec = write_spec(text)
    d = stage_dirs(spec)["train"]
    nan_at(1, 2)
    code, out = cli("run", str(spec))
    assert code == 2, out
    assert "not finite (nan)" in out and "epoch 2, step 3" in out and "checkpoint.pt" in out and "Traceback" not in out
    got, _ = checkpoint.load(d, None)
    assert (got["epoch"], got["step"]) == last  # the last good checkpoint
    assert all(torch.isfinite(v).all() for v in got["model"].values())
    assert len(artifacts.read_jsonl(d / "metrics.jsonl")) == 1  # the bad epoch was not logged


def test_nonfinite_loss_skip(write_spec, nan_at):
    spec = write_spec(DENSE.replace("epochs: 3", "epochs: 3\n    on_nonfinite: skip"))
    d = stage_dirs(spec)["train"]
    nan_at(1, 2)
    code, out = cli("run", str(spec))
    assert code == 0, out
    rows = artifacts.read_jsonl(d / "metrics.jsonl")
    assert [r["skipped_steps"] for r in rows] == [0, 1, 0]
    state, _ = artifacts.load_model_artifact(d / "model.pt")
    assert all(torch.isfinite(v).all() for v in state.values())


# --------------------------------------------------------------------------- paths
def test_paths_resolve_against_the_spec_file_and_output_is_not_wiped(tmp_path, monkeypatch):
    sub = tmp_path / "exp"
    sub.mkdir()
    (sub / "spec.yaml").write_text(DENSE.replace("epochs: 3", "epochs: 1").replace("output_dir: runs", "output_dir: out/here"))
    (sub / "out").mkdir()
    (sub / "out" / "notes.txt").write_text("keep me")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for extra in ([], ["--force"], ["--restart"]):
        code, out = cli("run", str(sub / "spec.yaml"), *extra)
        assert code == 0, out
    assert list((sub / "out" / "here" / "dense").glob("train-*/result.json"))
    assert (sub / "out" / "notes.txt").read_text() == "keep me"
    assert not list(elsewhere.iterdir())


# --------------------------------------------------------------------------- bad plugins
def _dist(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    (site / "badplug-0.1.dist-info").mkdir(parents=True)
    (site / "badplug-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: badplug\nVersion: 0.1\n")
    (site / "badplug-0.1.dist-info" / "entry_points.txt").write_text(textwrap.dedent("""\
        [pab.pruners]
        importfails = badplug_broken:Pruner
        notpydantic = badplug_ok:NotPydantic
        goodthird = badplug_ok:Good
        """))
    (site / "badplug_broken.py").write_text("import this_module_does_not_exist_anywhere\n")
    (site / "badplug_ok.py").write_text(textwrap.dedent("""\
        from pydantic import BaseModel
        class NotPydantic:
            class Params(dict):
                pass
            def score(self, *a, **k):
                raise RuntimeError
        class Good:
            '''A third-party pruner that loads fine.'''
            class Params(BaseModel):
                pass
            def score(self, *a, **k):
                raise RuntimeError
        """))
    return site


def test_broken_third_party_plugins_are_listed_and_refused(tmp_path):
    site = _dist(tmp_path)
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{ROOT}", XDG_CACHE_HOME=str(tmp_path / "cache"), CI="1", COLUMNS="200")

    def pab(*args):
        return subprocess.run([sys.executable, "-m", "pab_framework", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    p = pab("plugins")
    assert p.returncode == 0, p.stderr
    rows = {line.split("│")[2].strip(): line for line in p.stdout.splitlines() if line.count("│") >= 5}
    assert "broken" in rows["importfails"] and "ModuleNotFoundError" in p.stdout
    assert "broken" in rows["notpydantic"] and "not a pydantic model" in p.stdout
    assert "ok" in rows["goodthird"] and "broken" not in rows["goodthird"]
    assert "ok" in rows["synflow"] and "ok" in rows["bop"]
    spec = tmp_path / "spec.yaml"
    for name, why in (("importfails", "ModuleNotFoundError"), ("notpydantic", "not a pydantic model")):
        spec.write_text(TINY_SPEC.replace("name: synflow", f"name: {name}"))
        p = pab("validate", str(spec))
        assert p.returncode == 2, p.stdout + p.stderr
        assert f"stages.prune.pruner.name: pruner plugin '{name}' is installed but broken" in p.stderr and why in p.stderr
        assert "Traceback" not in p.stderr
    spec.write_text(TINY_SPEC)  # everything else keeps working beside them
    p = pab("validate", str(spec))
    assert p.returncode == 0, p.stderr


def test_pickle_of_another_protocol_is_refused_before_torch_reads_it(tmp_path, recwarn):
    """torch's weights_only loader warns about any pickle protocol but its own (2); pab refuses
    such a file first, with its protocol named, so nothing warns."""
    for proto in (4, 5):
        p = tmp_path / f"p{proto}.pt"
        p.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=proto))
        assert artifacts.pickle_protocol(p) == proto
        with pytest.raises(ArtifactError, match=f"refused: a pickle of protocol {proto}"):
            artifacts.torch_load_safe(p)
        zipped = tmp_path / f"z{proto}.pt"
        torch.save({"w": torch.ones(2)}, zipped, pickle_protocol=proto)  # a zip archive holding a protocol-4/5 pickle
        assert artifacts.pickle_protocol(zipped) == proto
        with pytest.raises(ArtifactError, match="refused"):
            artifacts.torch_load_safe(zipped)
    ok = tmp_path / "ok.pt"
    artifacts.torch_save_atomic(ok, {"w": torch.ones(2)})
    assert artifacts.pickle_protocol(ok) == 2 and artifacts.pickle_protocol(ok.read_bytes()) == 2
    assert torch.equal(artifacts.torch_load_safe(ok)["w"], torch.ones(2))
    assert not [w for w in recwarn.list if issubclass(w.category, UserWarning)], [str(w.message) for w in recwarn.list]


# --------------------------------------------------------------------------- file modes
@pytest.fixture
def umask():
    """Set the process umask for one test (and put the old one back)."""
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in root.rglob("*") if p.is_file()}


def test_every_file_written_gets_the_umask_mode(write_spec, tmp_path, umask):
    """The atomic writers' temporary files must not leave artifacts private (0600): under umask
    027 every file is 0640, as any new file would be, so a collaborator in the group reads runs."""
    umask(0o027)
    spec = write_spec(TINY_SPEC.replace("epochs: 2", "epochs: 1").replace("output_dir: runs", "output_dir: runs, loggers: [jsonl, csv]"))
    code, out = cli("run", str(spec))
    assert code == 0, out
    code, out = cli("report", str(tmp_path / "runs" / "tiny"))
    assert code == 0, out
    ck = checkpoint.save(tmp_path / "ck", "k" * 64, _payload(4))
    checkpoint.save(tmp_path / "ck", "k" * 64, _payload(5))  # the rotation keeps the mode too
    modes = _modes(tmp_path / "runs") | _modes(tmp_path / "ck")
    names = {Path(k).name for k in modes}
    assert {"model.pt", "result.json", "spec.yaml", "metrics.jsonl", "metrics.csv", "report.html", "checkpoint.pt", "checkpoint.prev.pt"} <= names
    assert any(n.endswith(".png") for n in names)
    assert {k: oct(m) for k, m in modes.items() if m != 0o640} == {}
    umask(0o022)
    artifacts.atomic_write_json(tmp_path / "r.json", {"a": 1})
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
    assert ck.stat().st_mode & 0o777 == 0o640  # an existing file keeps the mode it was written with
