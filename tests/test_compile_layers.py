"""torch.compile and the built-in layers: PSG and edge-popup keep a model in one graph, compile
once, and train as they do eagerly.

The fast tests trace cifar_resnet18 with `torch._dynamo.explain` (no Inductor) for the graph
breaks, and compile a tiny CNN (Inductor for the default settings and for bf16 autocast,
`aot_eager` for the rest of the settings matrix: the settings change only the arguments of PSG's
opaque operator, so the trace is what they test). The whole cifar_resnet18 matrix with Inductor
is `slow`.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pab_framework.modelutil import prunable_parameters
from pab_framework.transforms import TransformContext
from pab_plugins.models.resnet_cifar import cifar_resnet18
from pab_plugins.optimizers.bop_optim import Bop
from pab_plugins.quantizers.psg import PSG
from pab_plugins.transforms.edge_popup import EdgePopup

pytest.importorskip("torch._dynamo")

SETTINGS = [dict(sparsify=s, take_sign=t, threshold_mode=m, threshold=1e-2 if m == "relative" else 1e-4)
            for s, t, m in itertools.product([True, False], [False, True], ["relative", "absolute"])]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class TinyCNN(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))


def transformed(net: nn.Module, kind: str, **params) -> nn.Module:
    names = set(prunable_parameters(net))
    if kind == "psg":
        PSG().apply(net, PSG.Params(**params), TransformContext.of(net, names))
    elif kind == "edge_popup":
        EdgePopup().apply(net, EdgePopup.Params(density=0.5), TransformContext.of(net, names))
    return net


def step(net: nn.Module, x, y, amp: bool = False, forward=None) -> dict[str, torch.Tensor]:
    """One forward (by `forward`, e.g. the compiled `net`) and backward: the loss and every
    gradient of `net`, by name."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = F.cross_entropy((net if forward is None else forward)(x), y)
    loss.backward()
    out = {"loss": loss.detach().float()}
    out.update({n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None})
    return out


def psg_counts(model: nn.Module) -> dict:
    return PSG().stats(model)


def data(batch: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 16, 16, generator=g), torch.randint(0, 10, (batch,), generator=g)


def eager_and_compiled(kind: str, backend: str, amp: bool = False, **params):
    torch.manual_seed(0)
    eager = transformed(TinyCNN(), kind, **params)
    model = copy.deepcopy(eager)
    x, y = data()
    want = step(eager, x, y, amp)
    got = step(model, x, y, amp, forward=torch.compile(model, backend=backend))
    return eager, model, want, got


# ----------------------------------------------------------------------------- the operators
@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_psg_operators_pass_opcheck(path, channels_last, monkeypatch):
    """Schema (only `counts` is written), fake implementation (shapes, dtypes and strides equal to
    the real ones), no autograd of their own, and AOTAutograd with dynamic shapes."""
    monkeypatch.setenv("PAB_PSG_BACKEND", path)
    g = torch.Generator().manual_seed(0)
    x, w, gout = torch.randn(4, 6, 9, 9, generator=g).relu(), torch.randn(8, 6, 3, 3, generator=g), torch.randn(4, 8, 5, 5, generator=g)
    if channels_last:
        x, w, gout = (t.contiguous(memory_format=torch.channels_last) for t in (x, w, gout))
    w1 = torch.randn(8, 6, 1, 1, generator=g)  # (a 1x1 weight: its size-1 dims have strides that do not matter)
    if channels_last:
        w1 = w1.contiguous(memory_format=torch.channels_last)
    counts = torch.zeros(2, dtype=torch.int64)
    for full, sign in ((None, False), (torch.randn(8, 6, 3, 3, generator=g), True)):
        settings = (8, 16, 1e-2, True, full is None, sign, torch.float32)
        torch.library.opcheck(torch.ops.pab.psg_conv2d_weight_grad.default,
                              (gout, x, w, full, counts, [2, 2], [1, 1], [1, 1], 1, *settings))
        torch.library.opcheck(torch.ops.pab.psg_conv2d_weight_grad.default,
                              (gout, x, w1, None if full is None else full[:, :, :1, :1].contiguous(), counts, [2, 2], [0, 0],
                               [1, 1], 1, *settings))
        xl, wl, gl = torch.randn(16, 20, generator=g), torch.randn(7, 20, generator=g), torch.randn(16, 7, generator=g)
        torch.library.opcheck(torch.ops.pab.psg_linear_weight_grad.default,
                              (gl, xl, wl, None if full is None else torch.randn(7, 20, generator=g), counts, *settings))


# ----------------------------------------------------------------------------- graph breaks
@pytest.mark.parametrize("kind", ["plain", "psg", "edge_popup"])
def test_a_cifar_resnet18_traces_as_one_graph(kind):
    """Training forward (gradients on) and evaluation forward (no_grad, eval mode) alike."""
    torch.manual_seed(0)
    net = transformed(cifar_resnet18(width=8), kind)
    x = torch.randn(2, 3, 32, 32)
    e = torch._dynamo.explain(net)(x)
    assert (e.graph_count, e.graph_break_count) == (1, 0), [str(r.reason)[:200] for r in e.break_reasons]
    torch._dynamo.reset()
    net.eval()
    with torch.no_grad():
        e = torch._dynamo.explain(net)(x)
    assert (e.graph_count, e.graph_break_count) == (1, 0), [str(r.reason)[:200] for r in e.break_reasons]


# ----------------------------------------------------------------------------- same results
def assert_same(want: dict, got: dict, exact: bool) -> None:
    assert want.keys() == got.keys()
    for n in want:
        if exact:
            assert torch.equal(want[n], got[n]), n
        else:  # Inductor reorders float sums (BatchNorm, the loss): a few ulps
            torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("kind", ["plain", "psg", "edge_popup"])
def test_inductor_trains_as_eager(kind):
    eager, model, want, got = eager_and_compiled(kind, "inductor")
    assert_same(want, got, exact=False)
    if kind == "psg":
        assert psg_counts(model) == psg_counts(eager)


def test_inductor_psg_under_bf16_autocast():
    eager, model, want, got = eager_and_compiled("psg", "inductor", amp=True)
    for n in want:  # bf16 forward: the compiled casts and sums round alike within bf16's precision
        torch.testing.assert_close(got[n], want[n], rtol=2e-2, atol=1e-3, msg=n)
    assert psg_counts(model).keys() == psg_counts(eager).keys()


@pytest.mark.parametrize("params, amp", [(p, False) for p in SETTINGS] + [(SETTINGS[0], True), (SETTINGS[-1], True)],
                         ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items() if k != "threshold") if isinstance(v, dict) else ("bf16" if v else "fp32"))
def test_every_psg_setting_traces_and_trains_as_eager(params, amp):
    """aot_eager: dynamo, AOTAutograd's joint graph with PSG's operator and its fake, run by aten."""
    eager, model, want, got = eager_and_compiled("psg", "aot_eager", amp=amp, **params)
    assert_same(want, got, exact=True)
    assert psg_counts(model) == psg_counts(eager)
    kept = psg_counts(model)
    assert all(0 < v["kept"] <= v["total"] for v in kept.values()), kept


# ----------------------------------------------------------------------------- no recompilation
@pytest.mark.parametrize("kind", ["psg", "edge_popup"])
def test_compiles_once_for_training_and_once_for_evaluation(kind):
    """Steps with new batches, masks and signs that change, train/eval switches and the epoch's
    last, smaller batch compile nothing after the first training and evaluation graphs (and the
    one dynamic-batch graph the smaller batch asks for)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    # PSG: the model whose per-layer shapes made a graph-breaking layer recompile (cheaper: TinyCNN for edge-popup)
    net = cifar_resnet18(width=4) if kind == "psg" else TinyCNN()
    masked = set(prunable_parameters(net)) if kind == "psg" else set()
    net = transformed(net, kind)
    counter = CompileCounterWithBackend("aot_eager")
    model = torch.compile(net, backend=counter)
    opts = [torch.optim.SGD([p for n, p in net.named_parameters() if n not in masked and p.requires_grad], lr=0.1)]
    if masked:  # PaB's optimizer for the masked weights (it lays them out in its flat buffer at its first step)
        opts.append(Bop([p for n, p in net.named_parameters() if n in masked], ar=0.5, tau=0.0, implementation="eager"))

    def train(batch, seed):
        net.train()
        x, y = data(batch, seed)
        for opt in opts:
            opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x.repeat(1, 1, 2, 2)), y).backward()
        for opt in opts:
            opt.step()

    def evaluate(batch, seed):
        net.eval()
        with torch.no_grad():
            model(data(batch, seed)[0].repeat(1, 1, 2, 2))

    train(4, 1)
    assert counter.frame_count == 1
    train(4, 2)
    evaluate(4, 3)
    assert counter.frame_count == 2  # training and evaluation: the first ones
    for epoch in range(2):
        train(4, 4 + epoch)
        train(4, 6 + epoch)
        evaluate(4, 8 + epoch)
    assert counter.frame_count == 2
    train(3, 10)  # the epoch's last, smaller batch: one graph with a dynamic batch size...
    evaluate(3, 11)
    assert counter.frame_count == 4
    for batch in (4, 3, 2):  # ...which serves every batch size after it
        train(batch, 12 + batch)
        evaluate(batch, 20 + batch)
    assert counter.frame_count == 4
    if kind == "psg":
        assert sum(int(c) for c in opts[1].flip_counts()) > 0  # signs flipped in between


# ----------------------------------------------------------------------------- the whole matrix
def _inductor_discrepancy(kind: str, params: dict, amp: bool) -> dict[str, tuple[float, float]]:
    """Per gradient of a cifar_resnet18 (width 16, batch 8): (|compiled - eager|, |eager|)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = transformed(cifar_resnet18(width=16), kind, **params)
    model = copy.deepcopy(eager)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    want = step(eager, x, y, amp)
    got = step(model, x, y, amp, forward=torch.compile(model))
    assert want.keys() == got.keys()
    return {n: (float((got[n].double() - want[n].double()).norm()), float(want[n].double().norm())) for n in want}


@pytest.mark.slow
@pytest.mark.parametrize("case", [("plain", {}), ("edge_popup", {})] + [("psg", p) for p in SETTINGS], ids=str)
def test_cifar_resnet18_compiled_with_inductor_trains_as_eager(case):
    """BatchNorm's sums reordered by Inductor move the output gradients by ulps (BatchNorm's own
    gradients, sums that cancel, by more: hence the absolute 1e-6); PSG quantises the output
    gradients, so an entry on a rounding boundary moves by one code step (or flips a sign under
    take_sign): gradients compared as whole tensors."""
    kind, params = case
    rel = 3e-2 if params.get("take_sign") else 1e-3
    errors = _inductor_discrepancy(kind, params, amp=False)
    bad = {n: (err, norm) for n, (err, norm) in errors.items() if err > rel * norm + 1e-6}
    assert not bad, bad


@pytest.mark.slow
def test_cifar_resnet18_compiled_with_inductor_under_bf16_autocast():
    """Under bf16 autocast Inductor computes in float32 between its loads and stores where eager
    rounds every op to bf16: the plain model's gradients move by up to ~45 % (BatchNorm's, whose
    sums cancel). PSG's move as the plain model's do, no more."""
    plain = {n: err / max(norm, 1e-30) for n, (err, norm) in _inductor_discrepancy("plain", {}, amp=True).items()}
    psg = {n: err / max(norm, 1e-30) for n, (err, norm) in _inductor_discrepancy("psg", {}, amp=True).items()}
    assert plain.keys() == psg.keys()
    assert plain["loss"] < 1e-3 and psg["loss"] < 1e-3
    worse = {n: (psg[n], plain[n]) for n in psg if psg[n] > 1.1 * plain[n] + 1e-2}
    assert not worse, worse
