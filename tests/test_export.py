"""`pab export` and `pab_framework.load`: the network a stage found, as a small lossless file
(init recipe + mask bits + sign bits), as safetensors and as ONNX, and loaded back bitwise."""
from __future__ import annotations

import json
import re
import math
import struct

import pytest
import torch

import pab_framework
from conftest import CONFIGS
from pab_framework import export
from pab_framework.errors import ArtifactError, PabError
from pab_framework.pipeline import run_spec
from pab_framework.progress import Reporter
from pab_framework.specification import load_spec
from pab_plugins.exporters import container

# Every kind of stage a study leaves: PaB (prune + Bop), edge-popup (frozen init, found masks),
# lottery-ticket IMP (SGD-trained weights rewound to a dense run's), dense SGD, and an evaluation.
STUDY = """\
name: study
seed: 3
model: {name: digits_cnn, width: 8, init: kaiming_normal}
data: {name: digits, batch_size: 128}
stages:
  prune: {kind: prune, pruner: {name: synflow, density: 0.2, iterations: 3}}
  pab: {kind: train, after: [prune], epochs: 1, optimizer: {name: bop, ar: 0.01, tau: 1.0e-7, rest: {name: sgd, lr: 0.1}}}
  check: {kind: evaluate, after: [pab]}
  popup: {kind: train, epochs: 1, transforms: [{name: edge_popup, density: 0.3}], optimizer: {name: sgd, lr: 0.1}}
  dense: {kind: train, epochs: 1, keep_weights: [0], optimizer: {name: sgd, lr: 0.05}}
  imp_prune: {kind: prune, after: [dense], pruner: {name: magnitude, density: 0.5}}
  imp: {kind: train, after: [imp_prune], weights_from: {stage: dense, epoch: 0}, epochs: 1, optimizer: {name: sgd, lr: 0.05}}
runtime: {device: cpu, output_dir: runs, progress: none}
"""
X = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    d = tmp_path_factory.mktemp("study")
    (d / "spec.yaml").write_text(STUDY)
    return {o.stage_id: o for o in run_spec(load_spec(d / "spec.yaml"), reporter=Reporter(mode="none"))}


def logits(model):
    with torch.no_grad():
        return model(X)


def hows(path) -> set:
    return set(container.read_doc(path)["layout"])


def test_packed_quickstart_is_small_and_loads_bitwise(tmp_path):
    """The shipped quickstart (one epoch): ≤ (1 + density) bits per prunable weight + the other
    parameters + 8 KB, ≤ 60 KB, and the loaded network gives model.pt's logits bit for bit."""
    out = {o.stage_id: o for o in run_spec(load_spec(CONFIGS / "quickstart.yaml", [f"runtime.output_dir={tmp_path}", "stages.train.epochs=1"]),
                                           reporter=Reporter(mode="none"))}
    train = out["train"].dir
    e = export.export_stage(train, "packed")
    assert e.path == train / "model.pab" and e.bytes == e.path.stat().st_size
    state, masks = pab_framework.artifacts.load_model_artifact(train / "model.pt")
    prunable = sum(m.numel() for m in masks.values())
    density = sum(int(m.sum()) for m in masks.values()) / prunable
    others = sum(t.numel() * t.element_size() for n, t in state.items() if n not in masks)
    assert e.bytes <= math.ceil((1 + density) * prunable / 8) + others + 8192
    assert e.bytes <= 60_000 and e.ratio < 0.05
    assert hows(e.path) == {"d", "s"}  # Bop changed signs only: magnitudes regenerated
    ref = pab_framework.load(train / "model.pt")
    got = pab_framework.load(e.path)
    assert not got.training and torch.equal(logits(got), logits(ref))
    assert torch.equal(logits(pab_framework.load(train)), logits(ref))  # a stage directory stands for its model.pt


@pytest.mark.parametrize("stage, expect", [("prune", {"i"}), ("pab", {"s"}), ("popup", {"i"}), ("imp", {"v"}), ("dense", {"v"}),
                                           ("check", {"s"})])
def test_every_kind_of_stage_roundtrips(study, stage, expect):
    """Each stage kind exports in the cheapest form its weights allow, and packed and safetensors
    both load to model.pt's logits exactly (an evaluate stage exports the model it evaluated)."""
    d = study[stage].dir
    src = export.stage_source(d)
    ref = logits(src.module())
    packed = export.export_stage(d, "packed")
    assert hows(packed.path) - {"d"} == expect
    assert torch.equal(logits(pab_framework.load(packed.path)), ref)
    st = export.export_stage(d, "safetensors")
    assert st.path.suffix == ".safetensors" and torch.equal(logits(pab_framework.load(st.path)), ref)
    if stage != "check":
        assert torch.equal(ref, logits(pab_framework.load(d / "model.pt")))
    else:
        assert src.model_file == study["pab"].dir / "model.pt"
    if stage == "dense":  # every weight stored as it is: only the byte-per-weight masks shrink to bits
        assert packed.bytes >= 4 * sum(m.numel() for m in src.masks.values())
    else:
        assert packed.ratio < 0.5


def test_export_all_finds_every_complete_stage(study):
    root = study["pab"].dir.parent
    assert {p.name.split("-")[0] for p in export.stage_sources(root)} == set(study)
    assert {p.name.split("-")[0] for p in export.stage_sources(root.parent)} == set(study)  # the output directory too


def test_incomplete_and_foreign_directories_are_refused(study, tmp_path):
    with pytest.raises(ArtifactError, match="not a stage directory"):
        export.export_stage(tmp_path, "packed")
    half = tmp_path / "half"
    half.mkdir()
    (half / "spec.yaml").write_text((study["pab"].dir / "spec.yaml").read_text())
    with pytest.raises(ArtifactError, match="not complete"):
        export.export_stage(half, "packed")


def _rewrite(path, doc_edit=None, tensor_edit=None):
    """Re-encode a packed file with its document or tensors changed, its checksum made good again."""
    doc, tensors = container.load(path, "pab.packed", (1,))
    if doc_edit:
        doc_edit(doc)
    if tensor_edit:
        tensor_edit(tensors)
    doc.pop("content_sha256")
    path.write_bytes(container.sealed(tensors, doc))


def test_nothing_wrong_loads(study, tmp_path, monkeypatch):
    d = study["pab"].dir
    good = export.export_stage(d, "packed", tmp_path / "good.pab").path
    data = good.read_bytes()
    cases = {}
    (tmp_path / "short.pab").write_bytes(data[: len(data) - 100])
    cases["short.pab"] = "damaged or truncated"
    (tmp_path / "cut.pab").write_bytes(data[:20])
    cases["cut.pab"] = "not a file pab can load"
    edited = bytearray(data)
    edited[-5] ^= 0x40  # one bit of the last tensor
    (tmp_path / "edited.pab").write_bytes(bytes(edited))
    cases["edited.pab"] = "do not match the checksum"
    (tmp_path / "stranger.pab").write_bytes(b"\x00" * 64)
    cases["stranger.pab"] = "not a file pab can load"
    newer = tmp_path / "newer.pab"
    newer.write_bytes(data)
    _rewrite(newer, doc_edit=lambda doc: doc.update(version=2))
    cases["newer.pab"] = "version 2, which this pab does not read"
    relaid = tmp_path / "relaid.pab"  # a document that no longer describes its tensors (checksum made good again)
    relaid.write_bytes(data)
    _rewrite(relaid, doc_edit=lambda doc: doc.update(layout=doc["layout"].replace("s", "v", 1)))
    cases["relaid.pab"] = "layout does not match its tensors"
    for name, msg in cases.items():
        with pytest.raises(ArtifactError, match=msg) as e:
            pab_framework.load(tmp_path / name)
        assert name in str(e.value)
    # a torch that draws other numbers: the regenerated magnitudes miss their hash, nothing loads
    ref = logits(pab_framework.load(d / "model.pt"))
    stored = export.export_stage(d, "safetensors", tmp_path / "m.safetensors").path
    real = torch.nn.init.kaiming_normal_
    monkeypatch.setattr(torch.nn.init, "kaiming_normal_", lambda w, **kw: real(w, **kw).mul_(1.0 + 2**-20))
    with pytest.raises(ArtifactError, match="regenerated initial weights of '.*' differ"):
        pab_framework.load(good)
    # ... while model.pt and safetensors, which hold every weight, do not depend on the initialisation
    assert torch.equal(logits(pab_framework.load(d / "model.pt")), ref)
    assert torch.equal(logits(pab_framework.load(stored)), ref)


def test_edited_recipe_is_refused(study, tmp_path):
    path = export.export_stage(study["pab"].dir, "packed", tmp_path / "m.pab").path
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8 : 8 + n].replace(b'\\"seed\\": 3', b'\\"seed\\": 4')
    assert len(header) == n and header != raw[8 : 8 + n]
    path.write_bytes(raw[:8] + header + raw[8 + n :])
    with pytest.raises(ArtifactError, match="do not match the checksum"):
        pab_framework.load(path)


def test_onnx_runs_in_onnx_runtime_like_torch(study):
    pytest.importorskip("onnxruntime", reason="the export extra")  # installed with the test extra
    for stage in ("pab", "popup"):
        e = export.export_stage(study[stage].dir, "onnx")
        assert e.path.suffix == ".onnx" and "ONNX Runtime agrees" in e.note
        import onnxruntime as ort

        sess = ort.InferenceSession(str(e.path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {"input": X.numpy()})[0])
        assert (got - logits(export.stage_source(study[stage].dir).module())).abs().max() <= 1e-4


def test_onnx_without_the_extra_says_which_to_install(study, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxscript", None)
    from pab_framework.errors import install_command

    with pytest.raises(PabError, match=re.escape(install_command("export"))):
        export.export_stage(study["pab"].dir, "onnx")


def test_recorded_recipe_and_sources(study):
    doc = container.read_doc(export.export_stage(study["pab"].dir, "packed").path)
    assert doc["recipe"]["model"]["name"] == "digits_cnn" and doc["recipe"]["seed"] == 3
    assert doc["recipe"]["data_info"] == {"num_classes": 10, "input_shape": [1, 8, 8]}
    assert doc["versions"]["torch"] == torch.__version__.split("+")[0]
    assert doc["source"]["stage"] == "pab" and doc["source"]["density"] == pytest.approx(json.loads((study["pab"].dir / "result.json").read_text())["density"])


def test_the_command_line(study, tmp_path):
    from typer.testing import CliRunner

    from pab_framework.cli import app

    root = study["pab"].dir.parent
    run = CliRunner().invoke
    r = run(app, ["export", str(root), "--all"])
    assert r.exit_code == 0, r.output
    for o in study.values():  # every stage wrote its file (the evaluate stage its evaluated model's)
        assert (o.dir / "model.pab").is_file(), o.stage_id
    assert "vs model.pt" in r.output and "sign-trained" in r.output
    r = run(app, ["export", str(study["pab"].dir), "-f", "safetensors", "-o", str(tmp_path / "net.safetensors")])
    assert r.exit_code == 0 and (tmp_path / "net.safetensors").is_file()
    for args, msg in ((["export", str(tmp_path)], "not a stage directory"), (["export", str(study["pab"].dir), "-f", "onxx"], "did you mean 'onnx'"),
                      (["export", str(root), "--all", "-o", "x.pab"], "with --all each stage's file goes into its own directory")):
        r = run(app, args)
        assert r.exit_code == 2 and msg in r.output, (args, r.output)
    r = run(app, ["results", str(root)])
    assert r.exit_code == 0 and "model.pt / packed" in r.output
    assert study["pab"].result["data_info"] == {"num_classes": 10, "input_shape": [1, 8, 8]}  # recorded for loading without the data


def test_a_stage_computed_again_loses_the_exports_of_its_earlier_model(tmp_path):
    """`pab run --force` recomputes a stage: model.pab and model.safetensors written from its earlier
    model.pt would describe a network that is no longer the stage's, so they go (and the run says so)."""
    from typer.testing import CliRunner

    from conftest import TINY_SPEC
    from pab_framework.cli import app

    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY_SPEC.replace("epochs: 2", "epochs: 1"))
    args = ["run", str(spec), "--set", f"runtime.output_dir={tmp_path / 'runs'}"]
    assert CliRunner().invoke(app, args).exit_code == 0
    (train,) = (tmp_path / "runs" / "tiny").glob("train-*")
    for fmt in ("packed", "safetensors"):
        export.export_stage(train, fmt)
    (train / "notes.txt").write_text("mine")
    r = CliRunner().invoke(app, [*args, "--force"])
    assert r.exit_code == 0, r.output
    assert not (train / "model.pab").exists() and not (train / "model.safetensors").exists()
    assert "removed model.pab" in r.output and (train / "notes.txt").read_text() == "mine"  # nothing else touched
