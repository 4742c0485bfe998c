"""PaB's rivals on the engine: edge-popup (a transform over frozen weights), lottery-ticket
rewinding (masks from one stage, weights from another; repeated blocks), the comparison grid
(variants), and the errors `pab validate` gives for them."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import CONFIGS
from pab_framework import artifacts
from pab_framework.errors import SpecError
from pab_framework.masking import kept_count
from pab_framework.pipeline import run_spec
from pab_framework.progress import Reporter
from pab_framework.specification import load_spec
from pab_framework.transforms import TransformContext
from pab_plugins.transforms.edge_popup import EdgePopup

EDGE = """\
name: ep
seed: 1
model: {name: digits_cnn, width: 8, init: kaiming_constant_signed, batchnorm_affine: false}
data: {name: digits, batch_size: 128}
stages:
  train:
    kind: train
    epochs: 2
    transforms: [{name: edge_popup, density: 0.3}]
    optimizer: {name: sgd, lr: 0.1, momentum: 0.9, weight_decay: 5.0e-4, schedule: cosine}
  eval:
    kind: evaluate
    after: [train]
runtime: {device: cpu, output_dir: runs, progress: none}
"""


def run(path, *sets):
    return {o.stage_id: o for o in run_spec(load_spec(path, list(sets)), reporter=Reporter(mode="none"))}


# --------------------------------------------------------------------------- edge-popup
def test_edge_popup_keeps_every_weight_and_finds_exact_density_masks(write_spec):
    spec_path = write_spec(EDGE)
    spec = load_spec(spec_path)
    from pab_framework.modelutil import build_model

    init = build_model(spec.model, spec.data.plugin.info(spec.data.params), spec.seed).state_dict()
    out = run(spec_path)
    sd = torch.load(out["train"].dir / "model.pt", weights_only=True)
    assert set(sd["state_dict"]) == set(init)  # the plain architecture: no scores, loads into the spec's model
    for k, v in init.items():
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(sd["state_dict"][k], v), f"{k} changed"  # every weight bitwise its initial value
    assert not any(k.endswith((".bias",)) and "bn" in k for k in sd["state_dict"])
    for name, m in sd["masks"].items():
        assert int(m.sum()) == kept_count(0.3, m.numel()), name  # exactly `density` of each layer
    res = out["train"].result
    assert res["density"] == pytest.approx(sum(int(m.sum()) for m in sd["masks"].values()) / sum(m.numel() for m in sd["masks"].values()))
    # the masks found are the subnetwork the training measured: evaluating model.pt gives the same accuracy
    assert out["eval"].result["val_acc"] == pytest.approx(res["val_acc"])
    rows = [json.loads(l) for l in (out["train"].dir / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["supermask_changed"] <= 1 for r in rows)


@pytest.mark.parametrize("ranking", ["abs", "signed"])
def test_edge_popup_score_gradient_is_the_straight_through_formula(ranking):
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(16, 3)
    net = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), lin)
    w_conv, w_lin = conv.weight.detach().clone(), lin.weight.detach().clone()
    EdgePopup().apply(net, EdgePopup.Params(density=0.5, ranking=ranking), TransformContext.of(net, ["0.weight", "4.weight"]))
    x, y = torch.randn(5, 2, 6, 6), torch.tensor([0, 1, 2, 0, 1])
    F.cross_entropy(net(x), y).backward()
    assert conv.weight.grad is None and lin.weight.grad is None  # frozen

    # the formula, written out: m = top-k mask of the ranking, dL/ds = dL/d(w*m) * w (* sign(s) for abs)
    def mask(s):
        r = s.abs() if ranking == "abs" else s
        k = kept_count(0.5, s.numel())
        m = torch.zeros(s.numel())
        m[r.reshape(-1).argsort(descending=True)[:k]] = 1
        return m.reshape(s.shape)

    we_c = (w_conv * mask(conv.scores.detach())).requires_grad_()
    we_l = (w_lin * mask(lin.scores.detach())).requires_grad_()
    h = F.adaptive_avg_pool2d(F.relu(F.conv2d(x, we_c, conv.bias, padding=1)), 2).flatten(1)
    F.cross_entropy(F.linear(h, we_l, lin.bias), y).backward()
    for layer, w, we in ((conv, w_conv, we_c), (lin, w_lin, we_l)):
        want = we.grad * w
        if ranking == "abs":
            want = want * layer.scores.detach().sign()
        torch.testing.assert_close(layer.scores.grad, want)


# --------------------------------------------------------------------------- rewinding
def test_lth_imp_config_reaches_the_round_densities(tmp_path):
    out = run(CONFIGS / "lth_imp_digits.yaml", f"runtime.output_dir={tmp_path}", "runtime.device=cpu", "runtime.progress=none",
              "stages.dense.epochs=2", "stages.imp.stages.train.epochs=1", "model.width=8")
    dens = [out[f"train_r{r}"].result["density"] for r in (1, 2, 3)]
    total = out["prune_r1"].result["total"]
    # 0.8, 0.64, 0.512 of the prunable weights, as whole weights (the count the original keeps: n - int((1 - d) n))
    assert dens == [kept_count(d, total) / total for d in (0.8 ** 1, 0.512 ** (2 / 3), 0.512)]
    assert dens == [pytest.approx(d, abs=2 / total) for d in (0.8, 0.64, 0.512)]
    assert [out[f"prune_r{r}"].result["density"] for r in (1, 2, 3)] == dens
    assert (out["dense"].dir / artifacts.kept_weights_name(1)).is_file()
    # each round prunes among the previous round's survivors
    m = [torch.load(out[f"train_r{r}"].dir / "model.pt", weights_only=True)["masks"] for r in (1, 2, 3)]
    for a, b in zip(m, m[1:]):
        assert all(not (b[k] & ~a[k]).any() for k in a)


REWIND = """\
name: rw
seed: 2
model: {name: mlp, hidden: [32], init: kaiming_normal}
data: {name: digits, batch_size: 128}
stages:
  dense:
    kind: train
    epochs: 2
    keep_weights: [0, 1]
    optimizer: {name: sgd, lr: 0.05}
  prune:
    kind: prune
    after: [dense]
    pruner: {name: magnitude, density: 0.5}
  rewound:
    kind: evaluate
    after: [prune]
    weights_from: {stage: dense, epoch: 1}
  at_init:
    kind: evaluate
    after: [prune]
    weights_from: init
runtime: {device: cpu, output_dir: runs, progress: none}
"""


def test_masks_from_one_stage_and_weights_from_another(write_spec):
    from pab_framework.evaluation import evaluate

    spec_path = write_spec(REWIND)
    out = run(spec_path)
    masks = torch.load(out["prune"].dir / "model.pt", weights_only=True)["masks"]
    spec = load_spec(spec_path)
    from pab_framework.modelutil import apply_masks_, build_model
    from pab_framework.context import StageContext

    info = spec.data.plugin.info(spec.data.params)
    for sid, weights in (("rewound", torch.load(out["dense"].dir / "model-epoch1.pt", weights_only=True)["state_dict"]),
                         ("at_init", build_model(spec.model, info, spec.seed).state_dict())):
        model = build_model(spec.model, info, spec.seed)
        model.load_state_dict(weights)
        apply_masks_(dict(model.named_parameters()), masks)
        ctx = StageContext(spec, sid, spec.stages[sid], "", out[sid].dir, {}, torch.device("cpu"), Reporter(mode="none"))
        want = evaluate(model, ctx.batches("val"))
        assert out[sid].result["val_acc"] == pytest.approx(want["val_acc"]) and out[sid].result["val_loss"] == pytest.approx(want["val_loss"])
        assert out[sid].result["density"] == pytest.approx(0.5, abs=1e-3)
    # epoch 0 is the starting point, the same weights as the initialisation
    e0 = torch.load(out["dense"].dir / "model-epoch0.pt", weights_only=True)["state_dict"]
    init = build_model(spec.model, info, spec.seed).state_dict()
    assert all(torch.equal(e0[k], init[k]) for k in init)


# --------------------------------------------------------------------------- errors at validate
def cli(*args):
    from typer.testing import CliRunner

    from pab_framework.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def test_bad_sources_and_densities_are_clear_errors_at_validate(write_spec, tmp_path):
    p = write_spec(EDGE.replace("density: 0.3}", "density: 0}"))
    code, out = cli("validate", p)
    assert code == 2 and "spec.yaml:9, stages.train.transforms[0].density" in out and "greater than 0" in out and "Traceback" not in out
    code, out = cli("validate", write_spec(EDGE.replace("density: 0.3}", "density: 1.5}")))
    assert code == 2 and "less than or equal to 1" in out
    # rewinding to an epoch the stage did not keep
    code, out = cli("validate", write_spec(REWIND.replace("epoch: 1}", "epoch: 2}")))
    assert code == 2 and "stages.rewound.weights_from.epoch" in out and "keeps no weights after epoch 2" in out and "spec.yaml:18" in out
    code, out = cli("validate", write_spec(REWIND.replace("{stage: dense, epoch: 1}", "{stage: prune, epoch: 1}")))
    assert code == 2 and "'prune' (prune) keeps no weights per epoch" in out
    code, out = cli("validate", write_spec(REWIND.replace("{stage: dense, epoch: 1}", "{stage: dnse}")))
    assert code == 2 and "did you mean 'dense'" in out
    # a mask file whose shapes do not fit the model
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    artifacts.save_model(tmp_path / "other.pt", other, {"1.weight": torch.ones(16, 64, dtype=torch.bool)})
    code, out = cli("validate", write_spec(REWIND.replace("weights_from: init", f"weights_from: init\n    masks_from: {{path: {tmp_path / 'other.pt'}}}")))
    assert code == 2 and "stages.at_init.masks_from.path" in out and "mask '1.weight' has shape (16, 64)" in out and "(32, 64)" in out
    code, out = cli("validate", write_spec(REWIND.replace("weights_from: init", "weights_from: {path: nowhere.pt}")))
    assert code == 2 and "nowhere.pt not found" in out


def test_repeated_blocks_and_vars_errors(write_spec):
    base = (CONFIGS / "lth_imp_digits.yaml").read_text()
    with pytest.raises(SpecError, match=r"--set stages.imp.repeat=0, stages.imp.repeat: must be a whole number"):
        load_spec(CONFIGS / "lth_imp_digits.yaml", ["stages.imp.repeat=0"])
    p = write_spec(base.replace("start: {train: dense}", "start: {}"))
    with pytest.raises(SpecError, match=r"'train@previous' in round 1 needs `start"):
        load_spec(p)
    p = write_spec(base.replace('round: "${round}"', 'round: "${rnd}"'))
    with pytest.raises(SpecError, match=r"spec.yaml:\d+, .*\$\{rnd\} names no variable"):
        load_spec(p)


# --------------------------------------------------------------------------- the comparison grid
def test_comparison_grid_shares_stages_across_methods_and_densities():
    from pab_framework import grid as G

    g = G.load_grid(CONFIGS / "compare_hidden_digits.yaml")
    assert len(g.runs) == 60 and g.varied_keys[:1] == ["method"]
    plans = G.plan_grid(g)
    dirs = {(sp.stage_id, sp.dir) for rows in plans.values() for sp in rows}
    by_stage: dict[str, set] = {}
    for sid, d in dirs:
        by_stage.setdefault(sid, set()).add(d)
    assert len(by_stage["dense"]) == 3  # one dense run per seed: the baseline and IMP's pre-training, at every density
    assert len(by_stage["prune"]) == 12  # SynFlow shared by pab and pab_psg
    assert {f"train_r{r}" for r in (1, 2, 3)} <= set(by_stage)
    densities = sorted({round(run.spec.stages["prune_r3"].params.pruner.target_density(), 12) for run in g.runs if "prune_r3" in run.spec.stages})
    assert densities == [0.05, 0.1, 0.3, 0.5]
    ep = [run for run in g.runs if run.varied["method"] == "edge_popup"]
    assert all(r.spec.model.init == "kaiming_constant_signed" and not r.spec.model.batchnorm_affine for r in ep)
    # the CIFAR-10 version for a GPU cluster validates too
    assert len(G.load_grid(CONFIGS / "compare_hidden_cifar10.yaml").runs) == 60


def test_report_draws_a_line_per_method(tmp_path):
    from pab_framework.report import build_report

    rows = []
    for method, base in (("pab", 0.9), ("edge_popup", 0.8), ("dense_sgd", 0.95)):
        for d in (0.1, 0.5):
            for seed in (0, 1):
                rows.append({"run": len(rows) + 1, "method": method, "vars.density": d, "seed": seed, "status": "ok",
                             "val_acc": base + 0.01 * seed + (0 if method == "dense_sgd" else d / 10), "density": 1.0 if method == "dense_sgd" else d})
    (tmp_path / "results.json").write_text(json.dumps({"grid": "g", "varied": ["method", "vars.density", "seed"], "rows": rows}))
    rep = build_report(tmp_path)
    (sec,) = rep.sections
    (table,) = [t for t in sec.tables if t.id == "grid"]
    assert table.header[:2] == ["method", "density"]
    got = {(r[0], r[1]): (r[2], r[3], r[4]) for r in table.rows}
    assert set(got) == {(m, d) for m in ("pab", "edge_popup", "dense_sgd") for d in (0.1, 0.5)}
    n, mean, std = got[("pab", 0.5)]
    assert n == 2 and mean == pytest.approx(0.955) and std == pytest.approx(0.01 / math.sqrt(2))
    assert got[("dense_sgd", 0.1)][1] == pytest.approx(0.955)  # the dense baseline, as a flat line across densities
    assert "per method" in sec.figures[0].title
