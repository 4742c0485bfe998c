"""The `synthetic` dataset: seeded, balanced, learnable, generated once, and a drop-in for the
data section of the image recipes."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import CONFIGS, ROOT
from pab_framework.data import Batches
from pab_framework.errors import SpecError
from pab_framework.graph import stage_keys
from pab_framework.pipeline import run_spec
from pab_framework.progress import Reporter
from pab_framework.specification import load_spec
from pab_plugins.datasets.synthetic import Synthetic

SPEC = """\
name: syn
seed: 0
model: {name: mlp, hidden: [32], init: kaiming_normal}
data: {name: synthetic, input_shape: [3, 8, 8], train_size: 512, val_size: 256, batch_size: 64}
stages:
  train:
    kind: train
    epochs: 2
    optimizer: {name: bop, ar: 1.0e-3, tau: 1.0e-6, rest: {name: sgd, lr: 0.1}}
runtime: {device: cpu, output_dir: runs, progress: none}
"""


def build(split="train", **kw):
    p = Synthetic.Params(**kw)
    return Synthetic().build(p, split)


def test_seeded_balanced_and_shaped():
    a, b = build(train_size=100, num_classes=7), build(train_size=100, num_classes=7)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    x, y = a.tensors
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    counts = torch.bincount(y, minlength=7)
    assert counts.max() - counts.min() <= 1  # balanced
    assert not torch.equal(y, torch.arange(100) % 7)  # in a seeded order, not sorted by class
    other = build(train_size=100, num_classes=7, seed=1)
    assert not torch.equal(other.tensors[0], x)
    val = build("val", val_size=100, num_classes=7)
    assert not torch.equal(val.tensors[0], x)  # the splits draw their own noise
    assert build(image_size=20, train_size=4).tensors[0].shape == (4, 3, 20, 20)
    assert build(input_shape=[17], train_size=4).tensors[0].shape == (4, 17)
    assert Synthetic().info(Synthetic.Params(image_size=20, num_classes=5), base_dir=None).input_shape == (3, 20, 20)


def test_class_patterns_carry_the_label_and_signal_0_removes_it():
    """The class means of the inputs are `signal` x the class patterns (up to the noise)."""
    from pab_plugins.datasets.synthetic import patterns

    x, y = build(input_shape=[2, 8, 8], train_size=4000, num_classes=4, signal=2.0).tensors
    pats = patterns((2, 8, 8), 4, 0)
    for c in range(4):
        assert torch.allclose(x[y == c].mean(0), 2.0 * pats[c], atol=0.15)
    x0, y0 = build(input_shape=[2, 8, 8], train_size=4000, num_classes=4, signal=0.0).tensors
    for c in range(4):
        assert x0[y0 == c].mean(0).abs().max() < 0.15


def test_batched_on_the_device_by_indexing():
    ds = build(train_size=50)
    b = Batches(ds, 16, shuffle=True, seed=0, device=torch.device("cpu"))
    assert b.loader is None  # a TensorDataset: no DataLoader, no workers
    assert sum(len(y) for _, y in b) == 50


def test_bad_params_name_the_key(write_spec):
    with pytest.raises(SpecError, match=r"data.*image_size needs a \(C, H, W\) input_shape"):
        load_spec(write_spec(SPEC.replace("input_shape: [3, 8, 8]", "input_shape: [64], image_size: 8")))
    with pytest.raises(SpecError, match=r"GiB"):
        load_spec(write_spec(SPEC.replace("train_size: 512", "train_size: 100000000")))
    with pytest.raises(SpecError, match=r"data.*colour"):
        load_spec(write_spec(SPEC.replace("val_size: 256", "val_size: 256, colour: red")))


@pytest.mark.parametrize("config, shape", [("imagenet_r50.yaml", (3, 224, 224)), ("cifar10_r18_pab.yaml", (3, 32, 32))])
def test_image_recipes_switch_by_name_alone(config, shape):
    """The recipe's own data keys (root, image_size, ...) are accepted: image_size sets H = W, the
    file keys change nothing, not even the stage keys."""
    spec = load_spec(CONFIGS / config, ["data.name=synthetic"])
    assert spec.data.plugin.info(spec.data.params).input_shape == shape
    moved = load_spec(CONFIGS / config, ["data.name=synthetic", "data.root=/somewhere/else", "data.augment=false"])
    assert stage_keys(moved) == stage_keys(spec)
    assert "root" not in spec.model_dump(mode="json")["data"]


def test_training_on_it_learns(tmp_path, write_spec):
    out = run_spec(load_spec(write_spec(SPEC)), reporter=Reporter(mode="none"))
    assert out[-1].result["val_acc"] >= 0.9
    chance = run_spec(load_spec(write_spec(SPEC), ["data.signal=0"]), reporter=Reporter(mode="none"))
    assert chance[-1].result["val_acc"] <= 0.3  # nothing to learn: about 1/10


@pytest.mark.slow
def test_imagenet_recipe_runs_on_synthetic_data(tmp_path):
    """`pab run configs/imagenet_r50.yaml --set data.name=synthetic ...`: SynFlow on ResNet-50, then
    Bop with PSG, from the shipped recipe; made small by --set alone (about 40 s on 2 CPU cores)."""
    sets = ["data.name=synthetic", "data.train_size=64", "data.val_size=32", "data.image_size=32", "data.batch_size=32",
            "stages.prune.pruner.iterations=2", "stages.train.epochs=1", "stages.train.optimizer.implementation=eager",
            "runtime.nproc_per_node=1", "runtime.num_workers=0", "runtime.device=cpu", f"runtime.output_dir={tmp_path}"]
    p = subprocess.run([sys.executable, "-m", "pab_framework", "run", str(CONFIGS / "imagenet_r50.yaml"), "--progress", "plain",
                        *[a for s in sets for a in ("--set", s)]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    (train,) = (tmp_path / "imagenet_r50_pab_psg").glob("train-*")
    import json

    res = json.loads((train / "result.json").read_text())
    (prune,) = (tmp_path / "imagenet_r50_pab_psg").glob("prune-*")
    pres = json.loads((prune / "result.json").read_text())
    assert abs(pres["pool_density"] - 0.5) < 1e-3 and res["density"] == pres["density"] > 0.5  # (the dense shortcuts count overall)
    assert 0 <= res["val_acc"] <= 1
