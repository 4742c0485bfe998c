"""DDP on the CPU: gloo, 2 processes started through torch's elastic launcher by `pab run --nproc 2`."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, ROOT, with_hooks
from pab_framework import artifacts, distributed
from pab_framework.data import Batches
from pab_framework.distributed import DistInfo
from pab_framework.errors import PabError, SpecError
from pab_framework.pipeline import run_spec
from pab_framework.specification import load_spec

# the quickstart's shape (SynFlow, then Bop with SGD for the rest) on a model small enough for CI;
# no BatchNorm, so one process and two see exactly the same global batches and gradients
SPEC = """\
name: ddp
seed: 0
model: {name: mlp, hidden: [32], batchnorm: false, init: kaiming_normal}
data: {name: digits, batch_size: 128}
stages:
  prune:
    kind: prune
    pruner: {name: synflow, density: 0.3, iterations: 5}
  train:
    kind: train
    after: [prune]
    epochs: 3
    optimizer:
      name: bop
      ar: 1.0e-3
      tau: 1.0e-6
      rest: {name: sgd, lr: 0.1, momentum: 0.9, weight_decay: 5.0e-4, schedule: cosine}
runtime: {device: cpu, output_dir: runs, progress: plain}
"""


def pab(*args, env=None, timeout=240):
    """`pab ARGS` in a subprocess; `env` may ask for faults (PAB_TEST_FAIL: tests/hooks/pab_faults.py),
    which reach every rank the launcher starts."""
    e = with_hooks(dict(os.environ, **(env or {})))
    e.pop("WORLD_SIZE", None)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "pab_framework", *map(str, args)], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    return p, time.monotonic() - t0


def stage_dir(out: Path, stage: str) -> Path:
    (d,) = (out / "ddp").glob(f"{stage}-*")
    return d


def test_two_processes_train_like_one(tmp_path, write_spec):
    spec = write_spec(SPEC)
    one = run_spec(load_spec(spec, ["runtime.output_dir=one"]))
    p, wall = pab("run", spec, "--nproc", 2, "--set", "runtime.output_dir=two")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "on 2 processes" in p.stdout and p.stdout.count("epoch 3/3") == 1  # rank 0 alone reports
    res1 = {o.stage_id: o.result for o in one}
    two = tmp_path / "two"
    res2 = json.loads((stage_dir(two, "train") / "result.json").read_text())
    # every rank ended with bitwise the same weights and masks (the stage checks and records it)
    assert res2["world_size"] == 2
    for kind in ("weights", "masks"):
        digests = res2["rank_digests"][kind]
        assert len(digests) == 2 and digests[0] == digests[1]
    # the masks are the single-process masks; the weights match it up to float rounding
    s1, m1 = artifacts.load_model_artifact(stage_dir(tmp_path / "one", "train") / "model.pt")
    s2, m2 = artifacts.load_model_artifact(stage_dir(two, "train") / "model.pt")
    assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)
    for k in s1:
        assert torch.allclose(s1[k].float(), s2[k].float(), atol=1e-4), k
    assert abs(res2["val_acc"] - res1["train"]["val_acc"]) <= 0.02
    assert abs(res2["train_loss"] - res1["train"]["train_loss"]) < 1e-3
    rows = artifacts.read_jsonl(stage_dir(two, "train") / "metrics.jsonl")
    rows1 = artifacts.read_jsonl(stage_dir(tmp_path / "one", "train") / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1]["val_n"] == rows1[-1]["val_n"] == 359  # every val example once


@pytest.mark.slow
def test_the_quickstart_itself_on_two_processes(tmp_path):
    """configs/quickstart.yaml as shipped (SynFlow, Bop, PSG, BatchNorm) on 2 processes: the ranks
    agree bitwise, the masks are the single process's, the accuracy within 2 points of it."""
    from pab_framework.progress import Reporter

    qs = CONFIGS / "quickstart.yaml"
    p, _ = pab("run", qs, "--nproc", 2, "--progress", "plain", "--set", f"runtime.output_dir={tmp_path / 'two'}", "--set", "runtime.device=cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    one = {o.stage_id: o for o in run_spec(load_spec(qs, [f"runtime.output_dir={tmp_path / 'one'}", "runtime.device=cpu"]), reporter=Reporter(mode="none"))}
    (train2,) = (tmp_path / "two" / "quickstart").glob("train-*")
    res2 = json.loads((train2 / "result.json").read_text())
    assert res2["world_size"] == 2 and all(len(set(d)) == 1 for d in res2["rank_digests"].values())
    _, m1 = artifacts.load_model_artifact(one["prune"].dir / "model.pt")
    (prune2,) = (tmp_path / "two" / "quickstart").glob("prune-*")
    _, m2 = artifacts.load_model_artifact(prune2 / "model.pt")
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    assert abs(res2["val_acc"] - one["train"].result["val_acc"]) <= 0.02
    assert "psg_kept" in artifacts.read_jsonl(train2 / "metrics.jsonl")[-1]


# training alone (dense), so the failure tests reach a training step soon
TRAIN_ONLY = SPEC.replace("""  prune:
    kind: prune
    pruner: {name: synflow, density: 0.3, iterations: 5}
""", "").replace("    after: [prune]\n", "")


def test_failing_rank_ends_the_job(write_spec):
    spec = write_spec(TRAIN_ONLY)
    p, wall = pab("run", spec, "--nproc", 2, "--set", "stages.train.epochs=50", env={"PAB_TEST_FAIL": "1:step:3"}, timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]  # the failing rank's own exit code
    assert wall < 60
    assert "error: [rank 1] PAB_TEST_FAIL: rank 1 fails at step 3" in p.stderr
    assert "rank 1 of 2 failed (exit code 2" in p.stderr
    assert "Traceback" not in p.stderr


def test_crashing_rank_exits_nonzero(write_spec):
    spec = write_spec(TRAIN_ONLY)
    p, wall = pab("run", spec, "--nproc", 2, "--set", "stages.train.epochs=50", env={"PAB_TEST_FAIL": "0:step:2:crash"}, timeout=120)
    assert p.returncode == 1 and wall < 60
    assert "RuntimeError: PAB_TEST_FAIL: rank 0 crashes at step 2" in p.stderr  # a bug keeps its traceback


def test_only_rank_0_tracks_and_a_rank_that_dies_ends_its_tracker_run(tmp_path, write_spec):
    """runtime.loggers under DDP: one MLflow run (rank 0's), each epoch once; when rank 1 fails, rank 0
    ends its run (FAILED, or KILLED by the launcher's SIGTERM) on its way out instead of leaving it RUNNING."""
    from mlflow.tracking import MlflowClient

    db = tmp_path / "m.db"
    spec = write_spec(TRAIN_ONLY.replace("progress: plain", f"progress: plain, loggers: [jsonl, {{name: mlflow, tracking_uri: 'sqlite:///{db}'}}]"))
    p, wall = pab("run", spec, "--nproc", 2, "--set", "stages.train.epochs=50", env={"PAB_TEST_FAIL": "1:step:15"}, timeout=180)
    assert p.returncode == 2, p.stderr[-3000:]  # rank 1's own code; at epoch 2, step 3
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert run.info.status in ("FAILED", "KILLED")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1]


def test_a_worker_that_dies_is_restarted_and_the_run_ends_as_if_uninterrupted(tmp_path, write_spec):
    """runtime.max_restarts: 1. One of 2 workers is SIGKILLed mid-epoch: the launcher restarts both, which
    resume from the stage's checkpoint and end with bitwise the weights of an uninterrupted run."""
    spec = write_spec(TRAIN_ONLY.replace("    epochs: 3\n", "    epochs: 2\n    checkpoint_every_steps: 4\n")
                      .replace("progress: plain", "progress: plain, max_restarts: 1"))
    once = tmp_path / "worker-killed"  # made by the fault as it fires
    # global step 18: epoch 2, step 6 of 12, two steps after the step-16 checkpoint
    p, _ = pab("run", spec, "--nproc", 2, "--set", "runtime.output_dir=killed", env={"PAB_TEST_SIGNAL": "1:step:18:SIGKILL", "PAB_TEST_ONCE": str(once)},
               timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert once.is_file()  # the worker was killed
    assert "resuming train (train) from" in p.stdout and "epoch 2, step" in p.stdout
    assert " resumed " in p.stdout  # the results table's status
    q, _ = pab("run", spec, "--nproc", 2, "--set", "runtime.output_dir=whole")
    assert q.returncode == 0, q.stderr[-3000:]
    a, b = (stage_dir(tmp_path / d, "train") for d in ("whole", "killed"))
    sa, ma = artifacts.load_model_artifact(a / "model.pt")
    sb, mb = artifacts.load_model_artifact(b / "model.pt")
    assert sa.keys() == sb.keys() and all(sa[k].numpy().tobytes() == sb[k].numpy().tobytes() for k in sa)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert [r["epoch"] for r in artifacts.read_jsonl(b / "metrics.jsonl")] == [1, 2]
    assert json.loads((b / "result.json").read_text())["resumed"] is True


def test_max_restarts_reaches_the_launcher(write_spec, monkeypatch):
    from typer.testing import CliRunner

    from pab_framework.cli import app

    got = []
    monkeypatch.setattr(distributed, "launch", lambda argv, n, **kw: got.append((n, kw["max_restarts"], argv)) or 0)
    spec = write_spec(SPEC.replace("progress: plain", "progress: plain, max_restarts: 2"))
    for extra, want in (([], 2), (["--max-restarts", "5"], 5)):
        r = CliRunner().invoke(app, ["run", str(spec), "--nproc", "2", *extra])
        assert r.exit_code == 0, r.output
        assert got[-1][:2] == (2, want) and "--max-restarts" not in got[-1][2]  # (the restarted processes are not launchers)


def test_bad_spec_fails_before_launching(write_spec):
    spec = write_spec(SPEC.replace("batch_size: 128", "batch_size: 127"))
    p, _ = pab("run", spec, "--nproc", 2)
    assert p.returncode == 2
    assert "data.batch_size: 127 is the global batch" in p.stderr and p.stderr.count("error:") == 1  # said once, before any rank starts


@pytest.mark.slow
def test_sigterm_checkpoints_and_resumes(tmp_path, write_spec):
    spec = write_spec(SPEC.replace("epochs: 3", "epochs: 40"))
    e = dict(os.environ)
    e.pop("WORLD_SIZE", None)
    proc = subprocess.Popen([sys.executable, "-m", "pab_framework", "run", str(spec), "--nproc", "2"], cwd=ROOT, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("epoch 2/40"):
            break
    proc.send_signal(signal.SIGTERM)
    out, errs = proc.communicate(timeout=90)
    assert proc.returncode == 3, errs[-3000:]
    train = stage_dir(tmp_path / "runs", "train")
    assert (train / "checkpoint.pt").is_file() and not (train / "result.json").exists()
    p, _ = pab("run", spec, "--nproc", 2, "--set", "stages.train.epochs=40")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming train (train) from" in p.stdout
    rows = artifacts.read_jsonl(train / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == list(range(1, 41))


@pytest.mark.slow
def test_torchrun_runs_the_same_job(tmp_path, write_spec):
    spec = write_spec(SPEC)
    e = dict(os.environ)
    e.pop("WORLD_SIZE", None)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pab_framework", "run",
                        str(spec), "--set", "runtime.output_dir=tr"], cwd=ROOT, env=e, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    q, _ = pab("run", spec, "--nproc", 2, "--set", "runtime.output_dir=el")
    assert q.returncode == 0, q.stderr[-3000:]
    a, b = (json.loads((stage_dir(tmp_path / d, "train") / "result.json").read_text()) for d in ("tr", "el"))
    assert a["world_size"] == b["world_size"] == 2
    assert a["rank_digests"] == b["rank_digests"]  # bitwise the same training, whichever launcher


def _image_folder(root: Path, classes=3, train=4, val=2, size=40) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                px = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(d / f"{i}.png")
    return root


@pytest.mark.slow
def test_imagenet_recipe_end_to_end_tiny(tmp_path):
    """The ImageNet spec itself, shrunk by overrides only: 32-pixel crops of a generated image folder,
    2 SynFlow rounds, 1 epoch, 2 processes. PSG is left out until its plugin is merged."""
    root = _image_folder(tmp_path / "imagenet")
    sets = ["data.root=" + str(root), "data.image_size=32", "data.batch_size=4", "stages.prune.pruner.iterations=2",
            "stages.train.epochs=1", "runtime.output_dir=" + str(tmp_path / "runs"), "runtime.device=cpu", "runtime.num_workers=0"]
    if importlib.util.find_spec("pab_plugins.quantizers.psg") is None:
        sets.append("stages.train.quantizer=null")
    p, wall = pab("run", CONFIGS / "imagenet_r50.yaml", "--nproc", 2, *[a for s in sets for a in ("--set", s)], timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "on 2 processes" in p.stdout  # --nproc overrides runtime.nproc_per_node (8)
    (train,) = (tmp_path / "runs" / "imagenet_r50_pab_psg").glob("train-*")
    res = json.loads((train / "result.json").read_text())
    assert res["world_size"] == 2 and len(set(res["rank_digests"]["weights"])) == 1
    (prune,) = (tmp_path / "runs" / "imagenet_r50_pab_psg").glob("prune-*")
    pres = json.loads((prune / "result.json").read_text())
    assert pres["pool_density"] == pytest.approx(0.5, abs=1e-3)  # the pool's; the dense shortcut convolutions raise the overall density
    assert res["density"] == pytest.approx(pres["density"], abs=1e-6) and res["density"] > 0.5
    assert (train / "model.pt").is_file()


@pytest.mark.skipif(importlib.util.find_spec("pab_plugins.quantizers.psg") is None, reason="the psg quantizer plugin is not merged yet")
def test_imagenet_config_validates():
    s = load_spec(CONFIGS / "imagenet_r50.yaml")
    assert s.model.name == "resnet50" and s.runtime.nproc_per_node == 8 and s.runtime.batch_size_is == "global"
    assert s.stages["prune"].params.pruner.density == 0.5 and s.stages["prune"].params.pruner.iterations == 100
    t = s.stages["train"].params
    assert (t.epochs, t.optimizer.params.ar_decay.every, t.quantizer.name) == (100, 30, "psg")


# ----------------------------------------------------------------------- in-process, no processes
def test_env_parsing():
    assert not distributed.from_env({}).enabled
    d = distributed.from_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert (d.rank, d.local_rank, d.world_size, d.local_world_size, d.is_main, d.enabled) == (3, 1, 4, 2, False, True)
    with pytest.raises(PabError, match="inconsistent"):
        distributed.from_env({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    with pytest.raises(PabError, match="MASTER_ADDR"):
        distributed.from_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(PabError, match="not numbers"):
        distributed.from_env({"WORLD_SIZE": "two"})


def test_exit_code_of_a_failed_launch():
    class F:
        def __init__(self, code):
            self.exitcode = code

    assert distributed.exit_code_of({0: F(1), 1: F(2)}) == (2, 1)  # a rank's own pab code beats a peer's socket error
    assert distributed.exit_code_of({0: F(3), 1: F(4)}) == (4, 1)
    assert distributed.exit_code_of({1: F(3)}) == (3, 1)
    assert distributed.exit_code_of({0: F(-9), 1: F(1)}) == (1, 1)
    assert distributed.exit_code_of({0: F(-9)}) == (137, 0)
    assert distributed.exit_code_of({0: F(-15), 1: F(-6)}) == (134, 1)  # the abort, not the launcher's SIGTERM that followed it


def test_sharding_covers_every_example_once():
    x = torch.arange(10, dtype=torch.float32).unsqueeze(1)
    ds = torch.utils.data.TensorDataset(x, torch.zeros(10, dtype=torch.long))
    for make in (lambda r, pad: Batches(ds, 2, shuffle=True, seed=1, device=torch.device("cpu"), rank=r, world_size=3, pad=pad),
                 lambda r, pad: Batches(_Plain(ds), 2, shuffle=True, seed=1, device=torch.device("cpu"), rank=r, world_size=3, pad=pad)):
        seen = [torch.cat([b[0] for b in make(r, False)]).flatten().tolist() for r in range(3)]
        assert sorted(sum(seen, [])) == list(range(10))  # evaluation: every example exactly once
        padded = [make(r, True) for r in range(3)]
        assert len({len(b) for b in padded}) == 1  # training: as many steps on every rank
        assert set(sum((torch.cat([b[0] for b in p]).flatten().tolist() for p in padded), [])) == set(range(10))


class _Plain(torch.utils.data.Dataset):  # not a TensorDataset: the DataLoader path
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


def test_runtime_options_are_validated(write_spec):
    with pytest.raises(SpecError, match=r"runtime.prefetch_factor: .*needs DataLoader workers"):
        load_spec(write_spec(SPEC.replace("progress: plain", "progress: plain, prefetch_factor: 2")))
    with pytest.raises(SpecError, match=r"runtime.amp"):
        load_spec(write_spec(SPEC.replace("progress: plain", "progress: plain, amp: fp8")))
    s = load_spec(write_spec(SPEC.replace("progress: plain", "progress: plain, sync_bn: true")))
    two = DistInfo(rank=0, world_size=2)
    with pytest.raises(SpecError, match=r"runtime.sync_bn: synchronised BatchNorm needs CUDA"):
        distributed.check(s, two, torch.device("cpu"))
    s = load_spec(write_spec(SPEC.replace("batch_size: 128", "batch_size: 9")))
    with pytest.raises(SpecError, match=r"spec.yaml, data.batch_size: 9 is the global batch"):
        distributed.check(s, DistInfo(rank=0, world_size=2), torch.device("cpu"))
    distributed.check(load_spec(write_spec(SPEC.replace("batch_size: 128", "batch_size: 9").replace("progress: plain", "progress: plain, batch_size_is: per_rank"))),
                      DistInfo(rank=0, world_size=2), torch.device("cpu"))


def test_stage_keys_follow_what_runtime_changes_in_the_result(write_spec):
    from pab_framework.graph import stage_keys

    def keys(extra="", world_size=None):
        return stage_keys(load_spec(write_spec(SPEC.replace("progress: plain", "progress: plain" + extra))), world_size)

    base = keys()
    # a global batch means the same on any number of processes: results are shared
    assert keys(", nproc_per_node: 2") == base == keys(world_size=4)
    # a per-rank batch on 2 processes is a different global batch: training is keyed apart,
    # pruning (which does not shard) is shared
    per_rank = keys(", batch_size_is: per_rank", world_size=2)
    assert per_rank["prune"] == base["prune"] and per_rank["train"] != base["train"]
    assert keys(", batch_size_is: per_rank", world_size=1) == base
    assert keys(", batch_size_is: per_rank, nproc_per_node: 2")["train"] == per_rank["train"]
    amp = keys(", amp: bf16")
    assert amp["prune"] == base["prune"] and amp["train"] != base["train"]


def test_state_digest_sees_one_bit():
    a = {"w": torch.randn(5, 5), "m": torch.ones(3, dtype=torch.bool)}
    b = {k: v.clone() for k, v in a.items()}
    assert distributed.state_digest(a) == distributed.state_digest(b)
    b["w"].view(-1)[7] = torch.nextafter(b["w"].view(-1)[7], torch.tensor(1e9))
    assert distributed.state_digest(a) != distributed.state_digest(b)
    b = {k: v.clone() for k, v in a.items()}
    b["m"][1] = False
    assert distributed.state_digest(a) != distributed.state_digest(b)


def test_bf16_autocast_and_channels_last_train(tmp_path, write_spec):
    spec = write_spec(SPEC.replace("mlp, hidden: [32], batchnorm: false", "digits_cnn, width: 4").replace("epochs: 3", "epochs: 1")
                      .replace("iterations: 5", "iterations: 1").replace("progress: plain", "progress: plain, amp: bf16, channels_last: true"))
    out = run_spec(load_spec(spec))
    assert out[-1].result["val_acc"] > 0.1
