"""PSG: gradients equal a direct computation of the formulas; the model is otherwise untouched."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pab_framework import artifacts
from pab_framework.transforms import TransformContext
from plugins.quantizers.psg import PSG, PsgConv2d, PsgLinear
from tests.conftest import TINY_SPEC


def quant(x, bits, lo, hi):
    """The quantiser as the issue states it: 2^bits levels on [lo, hi], round to nearest."""
    delta = (hi - lo) / 2**bits
    if delta == 0:
        return torch.zeros_like(x)
    q = torch.clamp((x - lo) / delta, 0, 2**bits - 1).round()
    return (q * delta + lo) * (x != 0)  # zeros preserved


def quant_input(x, bits):
    per_sample = x.reshape(x.shape[0], -1).abs().amax(1)
    mx = float(per_sample.mean())
    lo = 0.0 if bool((x >= 0).all()) else -mx
    return quant(x, bits, lo, mx)


def quant_grad(g, bits):
    mx = float(g.abs().max())
    return quant(g, bits, -mx, mx)


def expected_weight_grad(layer_fn, x, w, g, p: PSG.Params):
    """Weight gradient by the formulas, with plain autograd on the quantised copies."""
    xq = quant_input(x, p.msb_bits)
    gq = quant_grad(g, p.msb_bits_grad)
    w_ = w.detach().clone().requires_grad_(True)
    (g_msb,) = torch.autograd.grad(layer_fn(xq, w_), w_, gq)
    w2 = w.detach().clone().requires_grad_(True)
    (g_full,) = torch.autograd.grad(layer_fn(x, w2), w2, g)
    thr = p.threshold * g_msb.abs().max() if p.threshold_mode == "relative" else p.threshold
    keep = g_msb.abs() >= thr
    out = torch.where(keep, g_msb, torch.zeros_like(g_msb) if p.sparsify else g_full)
    return out.sign() if p.take_sign else out, keep


CASES = [
    dict(threshold=1e-2, threshold_mode="relative", sparsify=True, take_sign=False),
    dict(threshold=1e-2, threshold_mode="relative", sparsify=False, take_sign=False),
    dict(threshold=3e-3, threshold_mode="absolute", sparsify=True, take_sign=True),
    dict(threshold=3e-3, threshold_mode="absolute", sparsify=False, take_sign=True),
    dict(threshold=0.2, threshold_mode="relative", sparsify=True, take_sign=False, msb_bits=4, msb_bits_grad=8),
]


def wrapped(module, **kw):
    model = nn.Sequential(module)
    PSG().apply(model, PSG.Params(**kw), TransformContext.of(model, {"0.weight"}))
    return model


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("relu_input", [True, False])
def test_conv2d_gradients_follow_the_formulas(case, relu_input):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=True)
    plain = copy.deepcopy(conv)
    x = torch.randn(4, 6, 9, 9)
    x[:, :, 0, 0] = 0
    if relu_input:
        x = x.relu()
    g = torch.randn(4, 8, 5, 5)
    model = wrapped(conv, **case)
    assert isinstance(model[0], PsgConv2d)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = model(xa)
    ref = plain(xb)
    torch.testing.assert_close(out, ref)  # the forward is the plain layer's
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad)  # the input gradient is the plain layer's
    torch.testing.assert_close(model[0].bias.grad, plain.bias.grad)
    want, keep = expected_weight_grad(lambda x_, w_: F.conv2d(x_, w_, None, 2, 1), x, conv.weight, g, PSG.Params(**case))
    torch.testing.assert_close(model[0].weight.grad, want, rtol=1e-4, atol=1e-6)
    assert 0 < keep.float().mean() < 1 or case["threshold_mode"] == "absolute"
    st = PSG().stats(model)["0.weight"]
    assert st == {"kept": int(keep.sum()), "total": keep.numel()}


@pytest.mark.parametrize("case", CASES)
def test_linear_gradients_follow_the_formulas(case):
    torch.manual_seed(1)
    lin = nn.Linear(20, 7)
    plain = copy.deepcopy(lin)
    x = torch.randn(16, 20)
    g = torch.randn(16, 7)
    model = wrapped(lin, **case)
    assert isinstance(model[0], PsgLinear)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, ref = model(xa), plain(xb)
    torch.testing.assert_close(out, ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(model[0].bias.grad, plain.bias.grad)
    want, _ = expected_weight_grad(lambda x_, w_: F.linear(x_, w_), x, lin.weight, g, PSG.Params(**case))
    torch.testing.assert_close(model[0].weight.grad, want, rtol=1e-4, atol=1e-6)


def test_a_model_keeps_its_keys_outputs_and_masks():
    from pab_framework.modelutil import apply_masks_, prunable_parameters
    from plugins.models.resnet_cifar import cifar_resnet18

    torch.manual_seed(0)
    net = cifar_resnet18(width=16)
    masks = {n: torch.rand_like(w) < 0.3 for n, w in prunable_parameters(net).items()}
    apply_masks_(prunable_parameters(net), masks)
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    before = net(x)
    keys = list(net.state_dict())
    psg = PSG()
    psg.apply(net, PSG.Params(), TransformContext.of(net, set(masks)))
    assert list(net.state_dict()) == keys
    assert len(psg.layers(net)) == len(masks)
    torch.testing.assert_close(net(x), before)
    # a few Bop steps: pruned weights stay zero, magnitudes stay
    from plugins.optimizers.bop_optim import Bop

    net.train()
    w0 = {n: p.detach().clone() for n, p in net.named_parameters() if n in masks}
    opt = Bop([p for n, p in net.named_parameters() if n in masks], ar=0.5, tau=0.0)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(net(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,))).backward()
        opt.step()
    for n, p in net.named_parameters():
        if n in masks:
            assert torch.equal(p.detach() == 0, ~masks[n] | (w0[n] == 0))
            assert torch.equal(p.detach().abs(), w0[n].abs())
    assert sum(int(c) for c in opt.flip_counts()) > 0


def test_saved_input_is_8_bit():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    model = wrapped(conv)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    x = torch.randn(4, 8, 16, 16).relu().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    big = [d for d, n in saved if n >= x.numel()]
    assert big == [torch.uint8], f"only the 8-bit codes of the input should be saved, got {saved}"


def test_bad_params_exit_2(tmp_path, write_spec):
    from typer.testing import CliRunner

    from cli import app

    text = TINY_SPEC.replace("    optimizer: {name: bop, ar: 1.0e-3, tau: 1.0e-6}",
                             "    optimizer: {name: bop, ar: 1.0e-3, tau: 1.0e-6}\n    quantizer: {name: psg, threshold_mode: relatve}")
    r = CliRunner().invoke(app, ["validate", str(write_spec(text))])
    assert r.exit_code == 2
    assert "stages.train.quantizer.threshold_mode" in r.output and "spec.yaml:14," in r.output


def test_quickstart_is_full_pab_and_reaches_95_percent(tmp_path):
    """configs/quickstart.yaml: SynFlow + Bop + PSG on the digits, as shipped."""
    from pab_framework.pipeline import run_spec
    from pab_framework.progress import Reporter
    from pab_framework.spec import load_spec
    from tests.conftest import CONFIGS

    spec = load_spec(CONFIGS / "quickstart.yaml", [f"runtime.output_dir={tmp_path}", "runtime.device=cpu"])
    assert spec.stages["train"].params.quantizer.name == "psg"
    out = {o.stage_id: o for o in run_spec(spec, reporter=Reporter(mode="none"))}
    assert out["train"].result["val_acc"] >= 0.95
    metrics = [json.loads(line) for line in (out["train"].dir / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < m["psg_kept"] <= 1 for m in metrics)
    layers = [json.loads(line) for line in (out["train"].dir / "layers.jsonl").read_text().splitlines()]
    last = {r["layer"] for r in layers if r["epoch"] == metrics[-1]["epoch"] and 0 < r["psg_kept"] <= 1}
    flips = {r["layer"] for r in artifacts.read_jsonl(out["train"].dir / "flips.jsonl") if r["epoch"] == metrics[-1]["epoch"]}
    assert last == flips
    # the saved model loads into the plain architecture
    sd = torch.load(out["train"].dir / "model.pt", weights_only=True)
    assert set(sd["masks"]) == last
