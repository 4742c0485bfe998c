"""Pruners: each score is its formula; the shared masking keeps exact counts, scopes and options."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pab_framework import masking
from pab_framework.modelutil import prunable_parameters
from pab_plugins.pruners.basic import Magnitude, SynFlow
from pab_plugins.pruners.saliency import GraSP, SNIP


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 8), nn.ReLU(), nn.Linear(8, 3)).double()


def data(n_batches=2, bs=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (bs,), generator=g)) for _ in range(n_batches)]


def call(name="x", **kw):
    return masking.MaskPolicy(**{"density": 0.3, **kw})


def inputs(batches=(), num_classes=3, shape=(2, 5, 5), train_mode=False):
    return masking.PruneInputs(input_shape=shape, num_classes=num_classes, batches=list(batches), train_mode=train_mode)


def test_snip_is_normalised_abs_grad_times_weight():
    net, batches = tiny_net().eval(), data()
    weights = prunable_parameters(net)
    got = SNIP().score(SNIP.Params(), net, weights, inputs(batches))
    # direct: sum the loss gradients over the batches, |g * w|, divided by the total
    net2 = copy.deepcopy(net)
    for x, y in batches:
        F.cross_entropy(net2(x), y).backward()
    raw = {n: (p.grad * p).abs() for n, p in prunable_parameters(net2).items()}
    total = sum(r.sum() for r in raw.values())
    for n in raw:
        torch.testing.assert_close(got[n], raw[n] / total)
    assert float(sum(g.sum() for g in got.values())) == pytest.approx(1.0)


def test_grasp_is_hessian_gradient_product_times_weight():
    net, batches = tiny_net().eval(), data()
    weights = prunable_parameters(net)
    got = GraSP().score(GraSP.Params(), net, weights, inputs(batches))
    # direct: g = grad of the summed batch losses at T=200; H g via the gradient of (g . g_detached)
    ws = list(weights.values())
    g = [torch.zeros_like(w) for w in ws]
    for x, y in batches:
        gi = torch.autograd.grad(F.cross_entropy(net(x) / 200, y), ws)
        g = [a + b for a, b in zip(g, gi)]
    hg = [torch.zeros_like(w) for w in ws]
    for x, y in batches:
        gi = torch.autograd.grad(F.cross_entropy(net(x) / 200, y), ws, create_graph=True)
        h = torch.autograd.grad(sum((a * b.detach()).sum() for a, b in zip(gi, g)), ws)
        hg = [a + b for a, b in zip(hg, h)]
    raw = [h * w.detach() for h, w in zip(hg, ws)]
    norm = abs(float(sum(r.sum() for r in raw))) + 1e-10
    for n, r in zip(weights, raw):
        torch.testing.assert_close(got[n], r / norm)
    assert any((v < 0).any() for v in got.values()), "GraSP scores carry a sign"


def test_synflow_is_data_independent_abs_grad_times_weight_on_the_linearised_net():
    net = tiny_net().eval()
    c = call(name="synflow", density=1.0)
    # through the framework (which linearises once): density 1 keeps all, so capture the scores
    seen = {}
    s = SynFlow()
    orig = s.score

    def spy(*a):
        out = orig(*a)
        seen.update(out)
        return out

    s.score = spy
    masking.prune(net, s, s.Params(), c, inputs())
    # direct: every state tensor made non-negative, ones input, R = sum of outputs
    lin = copy.deepcopy(net)
    with torch.no_grad():
        for t in lin.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    lin(torch.ones(1, 2, 5, 5, dtype=torch.float64)).sum().backward()
    for n, p in prunable_parameters(lin).items():
        torch.testing.assert_close(seen[n], (p.grad * p).abs())
    assert torch.equal(net[0].weight, tiny_net()[0].weight), "the model itself is untouched"


def deep_narrow(seed=0):
    """Eight bias-free layers (SynFlow's conservation argument is about weights; with unpruned
    biases feeding flow downstream, early layers can still starve)."""
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(16, 256, bias=False)]
    for _ in range(6):
        layers += [nn.ReLU(), nn.Linear(256, 256, bias=False)]
    layers += [nn.ReLU(), nn.Linear(256, 10, bias=False)]
    return nn.Sequential(*layers).double()


def test_synflow_avoids_layer_collapse_where_magnitude_does_not():
    net = deep_narrow()
    c = dict(density=0.001)
    syn = masking.prune(net, SynFlow(), SynFlow.Params(), call(name="synflow", iterations=100, **c), inputs(shape=(16,), num_classes=10))
    mag = masking.prune(net, Magnitude(), Magnitude.Params(), call(name="magnitude", **c), inputs(shape=(16,), num_classes=10))
    assert all(int(m.sum()) > 0 for m in syn.values()), "SynFlow keeps every layer alive"
    assert any(int(m.sum()) == 0 for m in mag.values()), "single-shot global magnitude empties a layer"


def test_local_scope_keeps_exactly_each_layers_share_and_ties_are_exact():
    net = tiny_net()
    m = masking.prune(net, Magnitude(), Magnitude.Params(), call(name="magnitude", density=0.37, scope="local"), inputs())
    for n, mask in m.items():
        assert int(mask.sum()) == mask.numel() - int((1 - 0.37) * mask.numel())
    # all-equal scores: the count is still exact, and the same on a second run
    flat = torch.ones(1000, dtype=torch.float64)
    a, b = masking.keep_top(flat, 123), masking.keep_top(flat.clone(), 123)
    assert int(a.sum()) == 123 and torch.equal(a, b)


def test_kth_largest_bracketing_is_exact_on_large_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300_000, generator=g, dtype=torch.float64)
    x[torch.rand(300_000, generator=g) < 0.5] = float("-inf")
    x[:1000] = 0.25  # a block of ties
    for k in (1, 17, 1000, 60_000, 149_000):
        assert masking._kth_largest(x, k) == torch.sort(x, descending=True).values[k - 1]
        assert int(masking.keep_top(x, k).sum()) == k


class Split(nn.Module):
    """~100k prunable weights (so thresholds take the sampled-bracket path), with the classifier
    registered between two body layers: the layers other than the classifier are not contiguous."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Linear(50, 300)
        self.fc = nn.Linear(40, 3)
        self.b = nn.Sequential(nn.ReLU(), nn.Linear(300, 300), nn.ReLU(), nn.Linear(300, 40))

    def forward(self, x):
        return self.fc(self.b(self.a(x.flatten(1))))


def reference_prune(model, pruner, c, inp):
    """The masking rules written out per layer: masked weights, pruned scores -inf, one threshold
    per group by a stable descending sort (ties: lower position first), n - int((1-d) n) kept."""
    work = copy.deepcopy(model).double().eval()
    params = prunable_parameters(work)
    orig = {n: p.detach().clone() for n, p in params.items()}
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    cls = "fc.weight"
    for k in range(1, c.iterations + 1):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(orig[n] * masks[n])
        sc = {n: v.detach().double().masked_fill(~masks[n], float("-inf")) for n, v in pruner.score(pruner.Params(), work, params, inp).items()}
        d = masking.density_at(k, c.iterations, c.density, c.schedule)
        groups = [([n for n in params if n != cls], d)] if c.scope == "global" else [([n], d) for n in params if n != cls]
        groups.append(([cls], masking.density_at(k, c.iterations, c.classifier_density, c.schedule)))
        new = {}
        for names, dd in groups:
            flat = torch.cat([sc[n].reshape(-1) for n in names])
            keep = torch.zeros(flat.numel(), dtype=torch.bool)
            keep[torch.sort(flat, descending=True, stable=True).indices[: masking.kept_count(dd, flat.numel())]] = True
            i = 0
            for n in names:
                new[n] = keep[i : i + masks[n].numel()].reshape(masks[n].shape)
                i += masks[n].numel()
        masks = new
    return masks


@pytest.mark.parametrize("scope", ["global", "local"])
@pytest.mark.parametrize("pruner", [GraSP(), SNIP()], ids=["grasp", "snip"])
def test_flat_masking_matches_the_rules_written_out(scope, pruner):
    net = Split()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 50, generator=g), torch.randint(0, 3, (16,), generator=g))]
    c = call(name="x", density=0.1, iterations=3, scope=scope, classifier_density=0.5)
    got = masking.prune(net, pruner, pruner.Params(), c, inputs(batches, shape=(50,)))
    want = reference_prune(net, pruner, c, inputs(batches, shape=(50,)))
    assert set(got) == set(want)
    for n in want:
        assert torch.equal(got[n], want[n]), n
        assert got[n].untyped_storage().nbytes() == got[n].numel(), "each mask owns its storage (no view of the flat vector)"


def test_keep_top_among_valid_entries_only():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200_000, generator=g, dtype=torch.float64)
    valid = torch.rand(200_000, generator=g) < 0.6
    x[~valid] = 1e9  # invalid entries must lose even with the highest scores
    x[5:50] = float("nan")
    for k in (10, 50_000, 119_000):
        keep = masking.keep_top(x, k, valid)
        want = torch.zeros_like(valid)
        want[torch.sort(torch.nan_to_num(x.masked_fill(~valid, float("-inf")), nan=float("-inf")), descending=True, stable=True).indices[:k]] = True
        assert torch.equal(keep, want), k


def test_global_density_exact_and_deterministic():
    net = tiny_net()
    a = masking.prune(net, Magnitude(), Magnitude.Params(), call(name="magnitude", density=0.3, iterations=3), inputs())
    b = masking.prune(net, Magnitude(), Magnitude.Params(), call(name="magnitude", density=0.3, iterations=3), inputs())
    total = sum(m.numel() for m in a.values())
    assert sum(int(m.sum()) for m in a.values()) == total - int(0.7 * total)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_classifier_density_bias_and_batchnorm_options():
    net = tiny_net()
    m = masking.prune(net, Magnitude(), Magnitude.Params(),
                      call(name="magnitude", density=0.2, classifier_density=0.5, prune_bias=True, prune_batchnorm=True), inputs())
    assert {"0.bias", "1.weight", "1.bias", "4.bias", "6.bias"} <= set(m)
    assert int(m["6.weight"].sum()) == 24 - int(0.5 * 24)
    rest = [n for n in m if n != "6.weight"]
    n_rest = sum(m[n].numel() for n in rest)
    assert sum(int(m[n].sum()) for n in rest) == n_rest - int(0.8 * n_rest)
    plain = masking.prune(net, Magnitude(), Magnitude.Params(), call(name="magnitude"), inputs())
    assert set(plain) == {"0.weight", "4.weight", "6.weight"}


def test_classifier_density_on_a_model_that_is_only_its_classifier():
    net = nn.Sequential(nn.Flatten(), nn.Linear(20, 3)).double()
    m = masking.prune(net, Magnitude(), Magnitude.Params(), call(name="magnitude", iterations=2, classifier_density=0.5), inputs(shape=(20,)))
    assert list(m) == ["1.weight"] and int(m["1.weight"].sum()) == 60 - int(0.5 * 60)


def test_train_mode_scores_with_batch_statistics():
    net, batches = tiny_net(), data()
    net[1].running_mean.fill_(3.0)  # eval mode uses these, train mode the batch's
    ev = masking.prune(net, SNIP(), SNIP.Params(), call(name="snip", density=0.5), inputs(batches))
    tr = masking.prune(net, SNIP(), SNIP.Params(), call(name="snip", density=0.5), inputs(batches, train_mode=True))
    assert any(not torch.equal(ev[n], tr[n]) for n in ev)
    assert float(net[1].running_mean[0]) == 3.0, "the model's BatchNorm statistics are untouched"


def test_prune_stage_options_end_to_end(tmp_path, write_spec):
    import json

    from pab_framework.pipeline import run_spec
    from pab_framework.progress import Reporter
    from pab_framework.specification import load_spec
    from tests.conftest import TINY_SPEC

    base = TINY_SPEC.replace("epochs: 2", "epochs: 1")
    outs = {}
    for tag, pruner in {
        "snip": "{name: snip, density: 0.2, batches: 2, batch_size: 32}",
        "grasp": "{name: grasp, density: 0.2, batches: 2, batch_size: 32}",
        "reinit": "{name: magnitude, density: 0.2, reinitialize: true}",
        "plain": "{name: magnitude, density: 0.2}",
    }.items():
        text = base.replace("pruner: {name: synflow, density: 0.3, iterations: 5}", f"pruner: {pruner}").replace("name: tiny", f"name: {tag}")
        outs[tag] = {o.stage_id: o for o in run_spec(load_spec(write_spec(text, f"{tag}.yaml")), reporter=Reporter(mode="none"))}
    for tag, o in outs.items():
        r = json.loads((o["prune"].dir / "result.json").read_text())
        assert sum(k for k, _ in r["layers"].values()) == r["kept"]
        assert r["density"] == pytest.approx(0.2, abs=1e-3)
        assert o["train"].result["val_acc"] > 0.3
    sd = {t: torch.load(outs[t]["prune"].dir / "model.pt", weights_only=True) for t in ("reinit", "plain")}
    assert all(torch.equal(sd["reinit"]["masks"][n], sd["plain"]["masks"][n]) for n in sd["plain"]["masks"])
    w_re, w_pl = sd["reinit"]["state_dict"]["1.weight"], sd["plain"]["state_dict"]["1.weight"]
    assert torch.equal(w_re == 0, w_pl == 0) and not torch.equal(w_re, w_pl), "re-drawn weights, same mask"


@pytest.mark.parametrize("bad", ["batches: 0", "batch_size: -1", "classifier_density: 1.5", "train_mode: maybe"])
def test_bad_options_exit_2(write_spec, bad):
    from typer.testing import CliRunner

    from pab_framework.cli import app
    from tests.conftest import TINY_SPEC

    text = TINY_SPEC.replace("pruner: {name: synflow, density: 0.3, iterations: 5}", f"pruner: {{name: snip, density: 0.3, {bad}}}")
    r = CliRunner().invoke(app, ["validate", str(write_spec(text))])
    assert r.exit_code == 2 and f"stages.prune.pruner.{bad.split(':')[0]}" in r.output
