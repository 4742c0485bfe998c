"""PSG: gradients equal a direct computation of the formulas; the model is otherwise untouched."""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pab_framework import artifacts
from pab_framework.transforms import TransformContext
from pab_plugins.quantizers import psg_ops, psg_quant
from pab_plugins.quantizers.psg import PSG, PsgConv2d, PsgLinear
from tests.conftest import ROOT, TINY_SPEC


def fq(v, delta, z, bits):
    """The quantiser as psg_ops documents it, written out: q = clamp(z + rint(v * (1/D)), 0, 2^bits - 1),
    value (q - z) * D, with D and 1/D float32 and ties rounded to even (torch.round)."""
    d = torch.tensor(delta if delta else 1.0, dtype=torch.float32)
    inv = (1.0 / d.double()).float()
    q = (torch.round(v.float() * inv) + z).clamp(0, 2**bits - 1)
    return ((q - z) * d).to(v.dtype)


def quant_input(x, bits):
    """Range: the batch mean of each sample's max|x|; [0, m] when x >= 0 everywhere, else [-m, m]."""
    m = float(x.reshape(x.shape[0], -1).abs().amax(1).double().mean())
    signed = bool((x < 0).any())
    return fq(x, m * (2 if signed else 1) / 2**bits, 2 ** (bits - 1) if signed else 0, bits)


def quant_grad(g, bits):
    """Range [-m, m], m = max|g| over the whole tensor."""
    m = float(g.abs().max())
    return fq(g, 2 * m / 2**bits, 2 ** (bits - 1), bits)


def expected_weight_grad(layer_fn, x, w, g, p: PSG.Params):
    """Weight gradient by the formulas, with plain autograd on the quantised copies (in x's dtype),
    then threshold / fill / sign in float32."""
    xq = quant_input(x, p.msb_bits)
    gq = quant_grad(g, p.msb_bits_grad)
    w_ = w.detach().to(x.dtype).requires_grad_(True)
    (g_msb,) = torch.autograd.grad(layer_fn(xq, w_), w_, gq)
    w2 = w.detach().to(x.dtype).requires_grad_(True)
    (g_full,) = torch.autograd.grad(layer_fn(x, w2), w2, g)
    g_msb, g_full = g_msb.float(), g_full.float()
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
    want, keep = expected_weight_grad(lambda x_, w_: F.linear(x_, w_), x, lin.weight, g, PSG.Params(**case))
    torch.testing.assert_close(model[0].weight.grad, want, rtol=1e-4, atol=1e-6)
    assert PSG().stats(model)["0.weight"] == {"kept": int(keep.sum()), "total": keep.numel()}


@pytest.mark.parametrize("path,dtype", [("host", torch.float32), ("host", torch.float64), ("device", torch.float32)])
def test_the_quantiser_rounds_ties_to_even_and_keeps_zeros(path, dtype):
    """The vectorised CPU passes (float32), the fused fake-quantise ops (other dtypes) and the device path."""
    quantize = (psg_quant.HostPath if path == "host" else psg_quant.DevicePath).quantize
    t = lambda v: torch.tensor(v, dtype=dtype)  # noqa: E731
    # one sample, x >= 0, max 256: D = 1, so x * (1/D) is x itself and .5 is a tie
    xq, _ = quantize(t([[0.0, 0.5, 1.5, 2.5, 3.5, 254.5, 256.0]]), t([1.0, 1.0]), psg_quant.PsgConfig())
    assert xq.tolist() == [[0.0, 0.0, 2.0, 2.0, 4.0, 254.0, 255.0]]  # the top value is clamped to 2^8 - 1 codes
    # signed: [-m, m] with 2^bits levels; zero maps back to exactly 0
    g = t([-4.0, -1.0, 0.0, 0.03125, 0.09375, 4.0])  # D = 8 / 2^8 = 1/32: the last two are 1 and 3 codes
    _, gq = quantize(t([[1.0, 1.0]]), g, psg_quant.PsgConfig(msb_bits_grad=8))
    assert gq.tolist() == [-4.0, -1.0, 0.0, 0.03125, 0.09375, 4.0 - 0.03125]
    g = t([-4.0, 0.015625, 0.046875])  # 0.5 and 1.5 codes: ties to 0 and 2
    _, gq = quantize(t([[1.0, 1.0]]), g, psg_quant.PsgConfig(msb_bits_grad=8))
    assert gq.tolist() == [-4.0, 0.0, 0.0625]
    # a sample with negatives: [-m, m], m the batch mean of the samples' max|x| = (2 + 6) / 2 = 4, D = 8 / 2^8
    xq, _ = quantize(t([[-2.0, 0.0, 1.0], [6.0, -0.046875, 0.015625]]), t([1.0]), psg_quant.PsgConfig())
    assert xq.tolist() == [[-2.0, 0.0, 1.0], [4.0 - 0.03125, -0.0625, 0.0]]


def test_a_model_keeps_its_keys_outputs_and_masks():
    from pab_framework.modelutil import apply_masks_, prunable_parameters
    from pab_plugins.models.resnet_cifar import cifar_resnet18

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
    from pab_plugins.optimizers.bop_optim import Bop

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


def _saved(model, x):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(x).sum().backward()
    return saved


@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_saves_what_the_plain_layer_saves(layer):
    """Nothing beyond the plain layer's own saved tensors (its input and weight): in a network the
    input is usually kept by the ReLU that made it, so any copy would be extra memory."""
    torch.manual_seed(0)
    plain = nn.Conv2d(8, 8, 3, padding=1) if layer == "conv" else nn.Linear(32, 8)
    x = torch.randn(4, 8, 16, 16) if layer == "conv" else torch.randn(16, 32)
    x = x.relu().requires_grad_(True)
    a = _saved(plain, x)
    b = _saved(wrapped(copy.deepcopy(plain)), x)
    big = lambda ts: sorted((t.dtype, t.numel()) for t in ts if t.numel() >= 64)  # noqa: E731
    assert big(b) == big(a)
    assert any(t is x for t in b)  # the input itself, not a copy


# ----------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("case", CASES[:3] + [dict()])
@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_cpu_bf16_autocast_follows_the_formulas(layer, case):
    torch.manual_seed(2)
    if layer == "conv":
        plain, x, g_shape = nn.Conv2d(6, 8, 3, padding=1), torch.randn(4, 6, 9, 9), (4, 8, 9, 9)
        fn = lambda x_, w_: F.conv2d(x_, w_, None, 1, 1)  # noqa: E731
    else:
        plain, x, g_shape = nn.Linear(20, 7), torch.randn(16, 20), (16, 7)
        fn = lambda x_, w_: F.linear(x_, w_)  # noqa: E731
    model = wrapped(copy.deepcopy(plain), **case)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = model(xa), plain(xb)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)  # the forward is the plain layer's, in bf16
    g = torch.randn(g_shape).bfloat16()
    out.backward(g)
    ref.backward(g)
    assert xa.grad.dtype == torch.float32 and torch.equal(xa.grad, xb.grad)
    assert torch.equal(model[0].bias.grad, plain.bias.grad)
    w = model[0].weight
    assert w.grad.dtype == torch.float32
    want, _ = expected_weight_grad(fn, x.bfloat16(), w, g, PSG.Params(**case))
    torch.testing.assert_close(w.grad, want, rtol=1.6e-2, atol=1e-3)  # bf16 tolerance


def test_a_model_trains_under_cpu_bf16_autocast():
    from pab_plugins.models.resnet_cifar import cifar_resnet18

    torch.manual_seed(0)
    net = cifar_resnet18(width=8)
    PSG().apply(net, PSG.Params(), TransformContext.of(net, {n for n, p in net.named_parameters() if p.dim() > 1}))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(net(x), y)
    loss.backward()
    for n, p in net.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), n


def test_fp16_with_an_absolute_threshold_or_signs_is_refused(tmp_path, write_spec):
    from typer.testing import CliRunner

    from pab_framework.cli import app

    base = TINY_SPEC.replace("    optimizer: {name: bop, ar: 1.0e-3, tau: 1.0e-6}",
                             "    optimizer: {name: bop, ar: 1.0e-3, tau: 1.0e-6}\n    quantizer: {name: psg, QQ}")
    base = base.replace("device: cpu", "device: cuda")  # fp16 is for CUDA (a CPU spec with amp: fp16 is refused for that alone)
    spec = write_spec(base.replace("QQ", "threshold_mode: absolute").replace("progress: plain", "progress: plain, amp: fp16"))
    r = CliRunner().invoke(app, ["validate", str(spec)])
    assert r.exit_code == 2, r.output
    assert "stages.train.quantizer.threshold_mode" in r.output and "spec.yaml:14" in r.output and "fp16" in r.output
    assert "Traceback" not in r.output
    spec = write_spec(base.replace("QQ", "take_sign: true"))
    r = CliRunner().invoke(app, ["validate", str(spec), "--set", "runtime.amp=fp16"])
    assert r.exit_code == 2 and "stages.train.quantizer.take_sign" in r.output, r.output
    for ok in ("threshold_mode: relative", "take_sign: false"):  # fp16 with a relative threshold is fine
        r = CliRunner().invoke(app, ["validate", str(write_spec(base.replace("QQ", ok))), "--set", "runtime.amp=fp16"])
        assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["validate", str(write_spec(base.replace("QQ", "threshold_mode: absolute"))), "--set", "runtime.amp=bf16"])
    assert r.exit_code == 0, r.output


# ----------------------------------------------------------------------------- op counts
class _Ops(TorchDispatchMode):
    """The aten ops dispatched, views (and detach) not counted: each is a kernel launch on a GPU.
    PSG's registered weight-gradient ops are counted by the aten ops they run (while the mode is
    open they are swapped for their implementations, which launch the same kernels). Reads of
    tensor values to Python are counted apart, in `reads`: the scalar reads (`.item()`, `float()`,
    `bool()`: `_local_scalar_dense`) and every `Tensor.tolist()` (through a wrapper)."""

    OPS = {"conv2d_weight_grad_op": psg_ops.conv2d_weight_grad, "linear_weight_grad_op": psg_ops.linear_weight_grad}

    def __init__(self):
        super().__init__()
        self.ops = []
        self.reads = 0

    def __enter__(self):
        self._saved = torch.Tensor.tolist, {name: getattr(psg_ops, name) for name in self.OPS}
        tolist = self._saved[0]

        def counted(t):
            self.reads += 1
            return tolist(t)

        torch.Tensor.tolist = counted
        for name, impl in self.OPS.items():
            setattr(psg_ops, name, impl)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist, ops = self._saved
        for name, op in ops.items():
            setattr(psg_ops, name, op)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            self.reads += 1
        elif not func.is_view:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def _layer(kind):
    torch.manual_seed(0)
    return (nn.Conv2d(8, 16, 3, padding=1), torch.randn(4, 8, 8, 8).relu()) if kind == "conv" else (nn.Linear(32, 16), torch.randn(8, 32).relu())


def _count(layer, x, grad=True, amp=False):
    """The ops of one steady-state step (after one untimed step); `_count.reads`: its host reads."""
    x = x.clone().requires_grad_(grad)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else torch.autocast("cpu", enabled=False)
    g = None
    if grad:
        with ctx:
            out = layer(x)
        g = torch.ones_like(out)
        out.backward(g)
        layer.zero_grad(set_to_none=True)
        x.grad = None
    with _Ops() as c:
        if grad:
            with ctx:
                out = layer(x)
            out.backward(g)
        else:
            with torch.no_grad(), ctx:
                layer(x)
    _count.reads = c.reads
    return c.ops


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_few_more_ops_than_the_plain_layer(kind, amp):
    """The CPU path (the CUDA path's launches: test_the_triton_kernels_equal_the_cpu_path): at most
    12 more than the plain layer, whatever the settings. With PaB's settings (sparsify, no
    take_sign) in fp32 the two copies are quantised with 5 vectorised passes (the fake-quantise
    kernels are scalar loops on a CPU, 4x slower); keeping the full-precision gradient (a compare
    and a select) or taking signs uses the 2 fake-quantise calls instead, to stay within 12."""
    plain, x = _layer(kind)
    psg = wrapped(copy.deepcopy(plain))
    a = _count(plain, x, amp=amp)
    b = _count(psg, x, amp=amp)
    assert len(b) - len(a) <= 12, (a, b)
    # CPU only: x's per-sample minima and maxima, min and max of g and of g_msb, and the kept count,
    # read to Python (no device to wait for)
    assert _count.reads == 7
    for case in CASES + [dict(threshold=1e-2, sparsify=False, take_sign=True)]:
        b = _count(wrapped(copy.deepcopy(plain), **case), x, amp=amp)
        assert len(b) - len(a) <= 12, (case, b)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_no_grad_and_frozen_weights_are_the_plain_layer(kind):
    plain, x = _layer(kind)
    psg = wrapped(copy.deepcopy(plain))
    for amp in (False, True):
        assert _count(psg, x, grad=False, amp=amp) == _count(plain, x, grad=False, amp=amp)
    plain.weight.requires_grad_(False)
    psg[0].weight.requires_grad_(False)
    assert _count(psg, x) == _count(plain, x)  # input (and bias) gradients only: nothing to quantise


# ----------------------------------------------------------------------------- the three paths agree
def _grads(path, case, amp, channels_last=False, monkeypatch=None):
    monkeypatch.setenv("PAB_PSG_BACKEND", path)
    torch.manual_seed(0)
    m = wrapped(nn.Conv2d(6, 8, 3, stride=2, padding=1), **case)
    x, g = torch.randn(4, 6, 9, 9), torch.randn(4, 8, 5, 5)
    if channels_last:
        m, x = m.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    with _Ops() as seen:  # the step's reads of tensor values to Python
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = m(x)
        out.backward(g.to(out.dtype))
    _grads.reads = seen.reads
    return m[0].weight.grad, x.grad, PSG().stats(m)


@pytest.mark.parametrize("case", CASES)
def test_the_device_path_equals_the_cpu_path(case, monkeypatch):
    for amp in (False, True):
        a = _grads("device", case, amp, monkeypatch=monkeypatch)
        assert _grads.reads == 0  # nothing read to the host: no sync on an accelerator
        b = _grads("host", case, amp, monkeypatch=monkeypatch)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


def test_channels_last_changes_nothing(monkeypatch):
    a = _grads("host", CASES[0], False, monkeypatch=monkeypatch)
    b = _grads("host", CASES[0], False, channels_last=True, monkeypatch=monkeypatch)
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert a[2] == b[2]


def test_a_non_finite_gradient_stays_visible():
    """A loss scaler must still see an overflow: an inf in g gives a non-finite weight gradient."""
    for case in CASES:
        m = wrapped(nn.Linear(4, 3), **case)
        x = torch.randn(5, 4, requires_grad=True)
        g = torch.randn(5, 3)
        g[1, 2] = math.inf
        m(x).backward(g)
        if not case["take_sign"]:  # (torch.sign maps NaN to 0: refused with fp16 for this reason)
            assert not torch.isfinite(m[0].weight.grad).all(), case


_TRITON_CHECK = r"""
import copy, os, sys, torch, torch.nn as nn
sys.path.insert(0, sys.argv[1])
from tests.test_psg import CASES, wrapped
from pab_plugins.quantizers.psg import PSG
from pab_plugins.quantizers import psg_triton
results = {}
for path in ("host", "triton"):
    os.environ["PAB_PSG_BACKEND"] = path
    for i, case in enumerate(CASES):
        for amp in (False, True):
            for kind in ("conv", "linear"):
                torch.manual_seed(i)
                layer = nn.Conv2d(6, 8, 3, stride=2, padding=1) if kind == "conv" else nn.Linear(20, 7)
                m = wrapped(layer, **case)
                x = torch.randn(4, 6, 9, 9) if kind == "conv" else torch.randn(16, 20)
                x = (x.relu() if i % 2 else x).requires_grad_(True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    out = m(x)
                out.backward(torch.randn(out.shape).to(out.dtype))
                results.setdefault((i, amp, kind), []).append((m[0].weight.grad, x.grad, PSG().stats(m)))
bad = [k for k, ((a, ax, sa), (b, bx, sb)) in results.items() if not (torch.equal(a, b) and torch.equal(ax, bx) and sa == sb)]
assert psg_triton.kernels_run() == {"quantize_pair", "combine"}, psg_triton.kernels_run()
# ties to even, the top code clamped, zeros kept (as test_the_quantiser_rounds_ties_to_even_and_keeps_zeros)
from pab_plugins.quantizers.psg_ops import PsgConfig
xq, gq = psg_triton.TritonPath.quantize(torch.tensor([[0.0, 0.5, 1.5, 2.5, 3.5, 254.5, 256.0]]),
                                        torch.tensor([-4.0, 0.015625, 0.046875, 0.0]), PsgConfig(msb_bits_grad=8))
assert xq.tolist() == [[0.0, 0.0, 2.0, 2.0, 4.0, 254.0, 255.0]] and gq.tolist() == [-4.0, 0.0, 0.0625, 0.0], (xq, gq)
# launches of the CUDA path: aten ops (allocations launch nothing) and Triton kernels, the interpreter's own traffic not seen
from torch.utils._python_dispatch import _disable_current_modes
from tests.test_psg import _count, _layer
launch, launches = psg_triton.launch, [0]
def counted(*a, **k):
    launches[0] += 1
    with _disable_current_modes():
        launch(*a, **k)
psg_triton.launch = counted
for kind in ("conv", "linear"):
    plain, x = _layer(kind)
    for amp in (False, True):
        a = _count(plain, x, amp=amp)
        n = launches[0]
        b = [op for op in _count(wrapped(copy.deepcopy(plain)), x, amp=amp) if not op.startswith("empty")]
        extra = len(b) + (launches[0] - n) // 2 - len(a)  # (_count runs two steps: one untimed)
        assert extra <= 12 and _count.reads == 0, (kind, amp, extra, a, b)
        print(kind, amp, "extra launches", extra)
print("OK" if not bad else f"differ: {bad}")
"""


def test_the_triton_kernels_equal_the_cpu_path():
    """The CUDA kernels, run by Triton's interpreter on the CPU: bitwise the CPU path's gradients and counts."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-c", _TRITON_CHECK, str(ROOT)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "OK", p.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_follows_the_formulas_without_host_reads():
    torch.manual_seed(0)
    for amp in (False, True):
        for case in CASES:
            conv = nn.Conv2d(6, 8, 3, stride=2, padding=1).cuda()
            m = wrapped(copy.deepcopy(conv), **case)
            x = torch.randn(4, 6, 9, 9, device="cuda", requires_grad=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                out = m(x)
            g = torch.randn(out.shape, device="cuda").to(out.dtype)
            with _Ops() as seen:
                out.backward(g)
            assert seen.reads == 0
            xd = x.detach().to(out.dtype)
            want, keep = expected_weight_grad(lambda x_, w_: F.conv2d(x_, w_, None, 2, 1), xd, conv.weight, g, PSG.Params(**case))
            tol = dict(rtol=1.6e-2, atol=1e-3) if amp else dict(rtol=2e-3, atol=1e-4)  # (TF32 convolutions)
            torch.testing.assert_close(m[0].weight.grad, want, **tol)
            assert m[0].weight.grad.dtype == torch.float32


# ----------------------------------------------------------------------------- the spec and the recipes
def test_bad_params_exit_2(tmp_path, write_spec):
    from typer.testing import CliRunner

    from pab_framework.cli import app

    text = TINY_SPEC.replace("    optimizer: {name: bop, ar: 1.0e-3, tau: 1.0e-6}",
                             "    optimizer: {name: bop, ar: 1.0e-3, tau: 1.0e-6}\n    quantizer: {name: psg, threshold_mode: relatve}")
    r = CliRunner().invoke(app, ["validate", str(write_spec(text))])
    assert r.exit_code == 2
    assert "stages.train.quantizer.threshold_mode" in r.output and "spec.yaml:14," in r.output


def test_quickstart_is_full_pab_and_reaches_95_percent(tmp_path):
    """configs/quickstart.yaml: SynFlow + Bop + PSG on the digits, as shipped."""
    from pab_framework.pipeline import run_spec
    from pab_framework.progress import Reporter
    from pab_framework.specification import load_spec
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


def test_imagenet_recipe_trains_in_bf16_on_a_tiny_image_folder(tmp_path):
    """configs/imagenet_r50.yaml with runtime.amp: bf16 (its own comment's advice), shrunk by
    overrides only, on the CPU: it prunes, trains with PSG in bf16 and writes its model."""
    from tests.test_distributed import _image_folder

    from pab_framework.pipeline import run_spec
    from pab_framework.progress import Reporter
    from pab_framework.specification import load_spec
    from tests.conftest import CONFIGS

    root = _image_folder(tmp_path / "imagenet", classes=2, train=4, val=1, size=36)
    sets = [f"data.root={root}", "data.image_size=32", "data.batch_size=8", "stages.prune.pruner.iterations=1",
            "stages.train.epochs=1", f"runtime.output_dir={tmp_path / 'runs'}", "runtime.device=cpu",
            "runtime.num_workers=0", "runtime.nproc_per_node=1", "runtime.amp=bf16"]
    spec = load_spec(CONFIGS / "imagenet_r50.yaml", sets)
    assert spec.stages["train"].params.quantizer.name == "psg"
    out = {o.stage_id: o for o in run_spec(spec, reporter=Reporter(mode="none"))}
    train = out["train"]
    metrics = [json.loads(line) for line in (train.dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and math.isfinite(metrics[0]["train_loss"]) and 0 < metrics[0]["psg_kept"] <= 1
    sd = torch.load(train.dir / "model.pt", weights_only=True)
    conv_weights = [k for k in sd["state_dict"] if k.endswith("weight") and sd["state_dict"][k].dim() == 4]
    assert conv_weights and all(sd["state_dict"][k].dtype == torch.float32 for k in conv_weights)  # the parameters stay fp32
    # half of the pool is kept; the shortcut convolutions, outside it, stay dense and count in `density`
    assert out["prune"].result["pool_density"] == pytest.approx(0.5, abs=1e-3)
    assert train.result["density"] == pytest.approx(out["prune"].result["density"]) and train.result["density"] > 0.5


def test_the_cuda_benchmark_runs_its_logic_on_the_cpu():
    """benchmarks/psg_step.py's device mode (both models, both precisions, plain and PSG) on tiny
    shapes on the CPU: the table and the last-line JSON."""
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "psg_step.py"), "--device", "cpu", "--tiny", "--reps", "1", "--warmup", "1"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    fig = json.loads(p.stdout.strip().splitlines()[-1])
    assert {r["model"] for r in fig["rows"]} == {"cifar_resnet18", "resnet50"}
    assert {r["precision"] for r in fig["rows"]} == {"fp32", "bf16"}
    for r in fig["rows"]:
        assert r["plain_ms"] > 0 and r["psg_ms"] > 0 and r["ratio"] == pytest.approx(r["psg_ms"] / r["plain_ms"], abs=1e-3)


@pytest.mark.slow
def test_the_benchmark_compiles_both_models():
    """benchmarks/psg_step.py --compile default: every case compiled (tiny shapes, CPU)."""
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "psg_step.py"), "--device", "cpu", "--tiny", "--reps", "1", "--warmup", "1",
                        "--compile", "default"], capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    fig = json.loads(p.stdout.strip().splitlines()[-1])
    assert fig["compile"] == "default" and len(fig["rows"]) == 4
    assert all(r["plain_ms"] > 0 and r["psg_ms"] > 0 for r in fig["rows"])
