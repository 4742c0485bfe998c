"""Missing data is found before any stage runs: `pab validate`, `pab run` and `pab grid` ask the
dataset plugin's `check()` about the splits the stages to run will read, and name the spec's file,
line and `data.root`, the normalised path and how to get the data (exit 2). Stages already complete
read nothing: a fully cached run works without its data."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pab_framework.cli import app
from pab_framework.datacheck import check_data, stage_splits
from pab_framework.errors import DataError, SpecError
from pab_framework.specification import load_spec

CIFAR = """\
name: cif
seed: 0
model: {name: mlp, hidden: [16]}
data:
  name: cifar10
  root: ROOT
  batch_size: 64
stages:
  prune:
    kind: prune
    pruner: {name: PRUNER, density: 0.5}
  train:
    kind: train
    after: [prune]
    epochs: 1
runtime: {device: cpu, output_dir: runs, progress: plain}
"""

FOLDER = """\
name: imgs
seed: 0
model: {name: mlp, hidden: [16]}
data: {name: imagefolder, root: images, image_size: 8, resize: 8, augment: false, batch_size: 4}
stages:
  prune:
    kind: prune
    pruner: {name: magnitude, density: 0.5}
  train:
    kind: train
    after: [prune]
    epochs: 1
    optimizer: {name: sgd, lr: 0.05}
  eval:
    kind: evaluate
    after: [train]
runtime: {device: cpu, output_dir: runs, progress: plain}
"""


def cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})
    return r.exit_code, r.output + (r.stderr if r.stderr_bytes is not None else "")


def image_folder(root: Path, classes: int = 2, n: int = 3, size: int = 8, empty: bool = False) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(0 if empty else n):
                Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()).save(d / f"{i}.png")
    return root


def test_missing_cifar_is_named_with_file_line_key_and_normalised_path(tmp_path):
    spec = tmp_path / "cif.yaml"
    spec.write_text(CIFAR.replace("ROOT", "sub/../nodata").replace("PRUNER", "synflow"))
    want = tmp_path / "nodata" / "cifar-10-batches-py"
    for cmd in ("validate", "run"):
        t0 = time.perf_counter()
        code, out = cli(cmd, spec)
        assert code == 2, out
        assert out.startswith(f"error: missing data: {spec}:6, data.root: CIFAR10 data not found: {want} does not exist"), out
        assert ".." not in out.split("data.root:")[1] and "data.download: true" in out
        assert "(stage train will read it)" in out  # SynFlow scores without data: only train reads it
        assert "Traceback" not in out and time.perf_counter() - t0 < 5
    assert not (tmp_path / "runs").exists()  # no stage started
    code, out = cli("run", spec, "--set", f"data.root={tmp_path / 'elsewhere'}")
    assert code == 2 and f"--set data.root={tmp_path / 'elsewhere'}, data.root: CIFAR10 data not found" in out, out


def test_a_pruner_that_scores_with_data_reads_the_training_split(tmp_path):
    spec = tmp_path / "cif.yaml"
    spec.write_text(CIFAR.replace("ROOT", "nodata").replace("PRUNER", "snip"))
    s = load_spec(spec)
    assert stage_splits(s, "prune") == ("train",) and stage_splits(s, "train") == ("train", "val")
    with pytest.raises(SpecError, match=r"\(stages prune, train will read it\)"):
        check_data(s, ["prune", "train"])
    check_data(s, [])  # nothing to run: nothing to read


def test_incomplete_cifar_lists_the_missing_files_and_download_skips_the_check(tmp_path):
    d = tmp_path / "data" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for f in ("batches.meta", "data_batch_1", "data_batch_2"):
        (d / f).write_bytes(b"x")
    spec = tmp_path / "cif.yaml"
    spec.write_text(CIFAR.replace("ROOT", "data").replace("PRUNER", "synflow"))
    code, out = cli("validate", spec)
    assert code == 2 and f"CIFAR10 data incomplete: {d} lacks data_batch_3, data_batch_4, data_batch_5, test_batch;" in out, out
    code, out = cli("validate", spec, "--set", "data.download=true", "--set", "data.root=nowhere")
    assert code == 0, out  # the data will be downloaded when a stage builds it


def test_image_folder_check(tmp_path):
    from pab_plugins.datasets.vision import ImageFolder

    plugin = ImageFolder()
    params = ImageFolder.Params(root="imgs", num_classes=2)
    with pytest.raises(DataError, match=f"{tmp_path / 'imgs'} does not exist") as e:
        plugin.check(params, ("train",), base_dir=tmp_path)
    assert e.value.key == "root"
    plugin.check(params, (), base_dir=tmp_path)  # num_classes given, no split read: info() needs no files
    with pytest.raises(DataError, match="train/<class>"):
        plugin.check(ImageFolder.Params(root="imgs"), (), base_dir=tmp_path)  # info() would count train/'s classes
    (tmp_path / "imgs" / "train").mkdir(parents=True)
    (tmp_path / "imgs" / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=f"{tmp_path / 'imgs' / 'train'} holds no class folders"):
        plugin.check(params, ("train", "val"), base_dir=tmp_path)
    plugin.check(params, ("val",), base_dir=tmp_path)


def test_a_cached_run_needs_no_data_until_a_stage_must_run(tmp_path):
    """Every stage complete: run and validate work with the data gone (results copied elsewhere,
    say). --force, or a changed stage, needs the data again and says so before anything runs."""
    image_folder(tmp_path / "images")
    spec = tmp_path / "imgs.yaml"
    spec.write_text(FOLDER)
    code, out = cli("run", spec)
    assert code == 0, out
    shutil.move(tmp_path / "images", tmp_path / "moved")
    code, out = cli("run", spec)
    assert code == 0 and out.count("reused") >= 3, out
    code, out = cli("validate", spec)
    assert code == 0 and out.count("complete") == 3, out
    before = sorted(p.name for p in (tmp_path / "runs" / "imgs").iterdir())
    code, out = cli("run", spec, "--force")
    assert code == 2 and f"{spec}:4, data.root: image folder not usable: {tmp_path / 'images'} does not exist" in out, out
    assert "(stages train, eval will read it)" in out  # magnitude pruning reads no data
    code, out = cli("run", spec, "--set", "stages.train.epochs=2")  # prune reused; train and eval must run
    assert code == 2 and "(stages train, eval will read it)" in out, out
    assert sorted(p.name for p in (tmp_path / "runs" / "imgs").iterdir()) == before  # nothing started
    code, out = cli("run", spec, "--set", "stages.train.epochs=2", "--set", f"data.root={tmp_path / 'moved'}")
    assert code == 0, out  # pointed at where the data now is, it runs (new keys: data.root is part of them)


def test_a_grid_checks_every_run_before_the_first_starts(tmp_path):
    image_folder(tmp_path / "images")
    (tmp_path / "imgs.yaml").write_text(FOLDER)
    g = tmp_path / "g.yaml"
    g.write_text(f"base: imgs.yaml\nzip:\n  seed: [0, 1, 2]\n  data.root: [images, {tmp_path / 'gone'}, {tmp_path / 'gone'}]\n")
    for cmd in ("validate", "grid"):
        code, out = cli(cmd, g)
        assert code == 2, out
        assert f"data.root: image folder not usable: {tmp_path / 'gone'} does not exist" in out and "(runs 2, 3)" in out, out
    assert not (tmp_path / "runs" / "imgs").exists()  # run 1 did not start either
