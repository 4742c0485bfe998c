"""Bop: bit-exact against a direct implementation of its formulas, resumable, and its statistics."""
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pab_plugins.optimizers.bop_optim import Bop
from tests.conftest import TINY_SPEC


def reference_bop(ws, grads_per_step, ar_at, tau_at, init_average):
    """The formulas, one weight at a time in spirit: m <- (1-ar) m + ar g (first step g + ar g with
    first_grad); flip w where |m| >= tau and sign(m) == sign(w) != 0."""
    ws = [w.clone() for w in ws]
    ms = [torch.zeros_like(w) for w in ws]
    flips = [0] * len(ws)
    for step, grads in enumerate(grads_per_step):
        ar, tau = ar_at(step), tau_at(step)
        for i, (w, g) in enumerate(zip(ws, grads)):
            if step == 0 and init_average == "first_grad":
                ms[i] = g.clone() + g * ar
            else:
                ms[i] = ms[i] * (1 - ar) + g * ar
            m = ms[i]
            flip = (m.abs() >= tau) & (torch.sign(m) == torch.sign(w)) & (w != 0)
            flips[i] += int(flip.sum())
            ws[i] = torch.where(flip, -w, w)
    return ws, ms, flips


def make_problem(seed=0, steps=50):
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 8, 3, 3), (64, 32), (10,), (300_000,)]
    ws = []
    for s in shapes:
        w = torch.randn(s, generator=g)
        w[torch.rand(s, generator=g) < 0.6] = 0  # pruned weights
        ws.append(w)
    # gradients around tau's scale, so that both flipping and not flipping happen
    grads = [[torch.randn(s, generator=g) * 1e-3 for s in shapes] for _ in range(steps)]
    return ws, grads


def run_ours(ws, grads, ar_at, tau_at, init_average, implementation="eager"):
    params = [torch.nn.Parameter(w.clone()) for w in ws]
    opt = Bop(params, ar=ar_at(0), tau=tau_at(0), init_average=init_average, implementation=implementation)
    for step, gs in enumerate(grads):
        opt.set_ar(ar_at(step))
        opt.set_tau(tau_at(step))
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return params, opt


@pytest.fixture(scope="module")
def compiled_ok():
    """torch.compile works here (Inductor and a C++ compiler): one tiny compiled step."""
    pytest.importorskip("torch._inductor")
    p = [torch.nn.Parameter(torch.ones(3))]
    p[0].grad = torch.ones(3)
    try:
        Bop(p, implementation="compiled").step()
    except Exception as e:  # pragma: no cover - machines without a compiler
        pytest.skip(f"torch.compile unavailable: {type(e).__name__}: {e}")


@pytest.fixture(params=["eager", "compiled"])
def implementation(request):
    if request.param == "compiled":
        request.getfixturevalue("compiled_ok")
    return request.param


@pytest.mark.parametrize("init_average", ["zero", "first_grad"])
@pytest.mark.parametrize("decay", [False, True])
def test_bit_exact_against_the_formulas(init_average, decay, implementation):
    ws, grads = make_problem(seed=1 if decay else 0)
    ar_at = (lambda s: 1e-2 * (0.5 ** (s // 10))) if decay else (lambda s: 1e-2)
    tau_at = (lambda s: 1e-5 * (0.3 ** (s // 20))) if decay else (lambda s: 1e-5)
    ref_w, ref_m, ref_flips = reference_bop(ws, grads, ar_at, tau_at, init_average)
    params, opt = run_ours(ws, grads, ar_at, tau_at, init_average, implementation)
    assert opt.last_implementation == implementation
    for p, w, m, w0 in zip(params, ref_w, ref_m, ws):
        assert torch.equal(p.detach(), w)
        assert torch.equal(opt.state[p]["moving_average"], m)
        assert torch.equal(p.detach().abs(), w0.abs()), "magnitudes never change"
        assert torch.equal(p.detach() == 0, w0 == 0), "zeros stay zero"
    assert [int(c) for c in opt.flip_counts()] == ref_flips
    assert sum(ref_flips) > 100, "the problem should make Bop flip"
    changed = sum(int((p.detach() != w0).sum()) for p, w0 in zip(params, ws))
    assert 0 < changed < sum(int((w0 != 0).sum()) for w0 in ws)


def tiny_problem(steps=4):
    """Weights of +-1e-30 and gradients of +-1e-20: m * w underflows to 0 in float32, so a product
    test would see no sign agreement; the signs do agree for about half of them."""
    g = torch.Generator().manual_seed(5)
    n = 64
    w = torch.where(torch.rand(n, generator=g) < 0.5, -1e-30, 1e-30)
    w[::7] = 0  # pruned
    grads = [[torch.where(torch.rand(n, generator=g) < 0.5, -1e-20, 1e-20)] for _ in range(steps)]
    return [w], grads


@pytest.mark.parametrize("init_average", ["zero", "first_grad"])
def test_tiny_magnitudes_flip_by_sign(init_average, implementation):
    ws, grads = tiny_problem()
    ar_at, tau_at = (lambda s: 1e-3), (lambda s: 1e-25)
    ref_w, ref_m, ref_flips = reference_bop(ws, grads, ar_at, tau_at, init_average)
    params, opt = run_ours(ws, grads, ar_at, tau_at, init_average, implementation)
    assert torch.equal(params[0].detach(), ref_w[0]) and torch.equal(opt.state[params[0]]["moving_average"], ref_m[0])
    assert [int(c) for c in opt.flip_counts()] == ref_flips
    # the case is one a product test gets wrong: on the first step m * w is 0 everywhere
    m0 = grads[0][0] * 1e-3 if init_average == "zero" else grads[0][0] + grads[0][0] * 1e-3
    assert int((m0 * ws[0] > 0).sum()) == 0
    first = ((m0 > 0) & (ws[0] > 0) | (m0 < 0) & (ws[0] < 0)).sum()
    assert ref_flips[0] >= int(first) > 10


def test_tau_zero_counts_no_flip_of_a_zero_weight(implementation):
    """tau = 0: a weight flips where m has its sign, however small m is; a zero weight never
    flips (nor counts), and a weight whose m is exactly 0 does not either."""
    w = torch.tensor([0.0, 0.0, 1.0, -1.0, 1.0, -2.0])
    g = torch.tensor([0.0, 1e-30, 0.0, 0.0, 1e-30, 1e-3])
    ref_w, ref_m, ref_flips = reference_bop([w], [[g]], lambda s: 0.5, lambda s: 0.0, "zero")
    params, opt = run_ours([w], [[g]], lambda s: 0.5, lambda s: 0.0, "zero", implementation)
    assert torch.equal(params[0].detach(), ref_w[0])
    assert torch.equal(params[0].detach(), torch.tensor([0.0, 0.0, 1.0, -1.0, -1.0, -2.0]))
    assert [int(c) for c in opt.flip_counts()] == ref_flips == [1]


def test_save_load_continue_equals_never_stopping(implementation):
    ws, grads = make_problem(steps=30)
    ar_at, tau_at = (lambda s: 1e-2), (lambda s: 1e-5)
    straight, _ = run_ours(ws, grads, ar_at, tau_at, "first_grad", implementation)

    first, opt = run_ours(ws, grads[:12], ar_at, tau_at, "first_grad", implementation)
    state = opt.state_dict()
    import io
    buf = io.BytesIO()
    torch.save({"w": [p.detach() for p in first], "opt": state}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # what the checkpoint loader does
    params = [torch.nn.Parameter(w.clone()) for w in saved["w"]]
    opt2 = Bop(params, ar=1e-2, tau=1e-5, init_average="first_grad", implementation=implementation)
    opt2.load_state_dict(saved["opt"])
    for gs in grads[12:]:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt2.step()
    for a, b in zip(params, straight):
        assert torch.equal(a, b)
    # the flip counters come back as exact integers, even past float32's 2^24
    opt2.state[params[0]]["flips"] += 2**25 + 1
    opt3 = Bop([torch.nn.Parameter(p.detach().clone()) for p in params], ar=1e-2, tau=1e-5)
    opt3.load_state_dict(opt2.state_dict())
    assert [c.dtype for c in opt3.flip_counts()] == [torch.int64] * len(params)
    assert [int(c) for c in opt3.flip_counts()] == [int(c) for c in opt2.flip_counts()]


class OpLog(TorchDispatchMode):
    """The aten operations dispatched while active (a kernel launch each on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


# operations that read a value back to the host or move one onto the device
HOST_DEVICE = ("_local_scalar_dense", "item", "is_nonzero", "equal", "lift_fresh", "_to_copy", "tolist")


def test_step_does_not_synchronise_or_use_float64(monkeypatch, implementation):
    ws, grads = make_problem(steps=9)
    params = [torch.nn.Parameter(w.clone()) for w in ws]
    opt = Bop(params, ar=1e-2, tau=1e-5, init_average="first_grad", implementation=implementation)
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    opt.step()  # lays out the flat buffers (and compiles, once per process)

    def boom(*a, **k):
        raise AssertionError("a host sync or a new host tensor inside Bop.step")

    def steps(rng, log=None):
        for s in rng:
            opt.set_ar(1e-2 * 0.5**s)  # the schedule changes every step: no new tensor for it
            opt.set_tau(1e-5 * 0.7**s)
            if s % 2:  # new gradient tensors (set_to_none) on odd steps, accumulated ones on even
                for p, g in zip(params, grads[s]):
                    p.grad = g.clone()
            else:
                opt.zero_grad(set_to_none=False)
                for p, g in zip(params, grads[s]):
                    p.grad.add_(g)
            if log is None:
                opt.step()
            else:
                with log:
                    opt.step()

    monkeypatch.setattr(torch.Tensor, "item", boom)
    monkeypatch.setattr(torch.Tensor, "tolist", boom)
    monkeypatch.setattr(torch.Tensor, "__bool__", boom)
    monkeypatch.setattr(torch, "tensor", boom)
    steps(range(1, 5))  # the real thing (compiled code runs compiled)
    log = OpLog()
    steps(range(5, 9), log)  # every aten op (a TorchDispatchMode runs compiled functions eagerly)
    monkeypatch.undo()
    assert log.ops and not [op for op in log.ops if any(f"aten.{h}." in op for h in HOST_DEVICE)]
    assert opt.last_implementation == implementation
    ref_w, ref_m, ref_flips = reference_bop(ws, grads, lambda s: 1e-2 * 0.5**s, lambda s: 1e-5 * 0.7**s, "first_grad")
    assert all(torch.equal(p.detach(), w) for p, w in zip(params, ref_w))
    assert [int(c) for c in opt.flip_counts()] == ref_flips
    assert all(st["moving_average"].dtype == torch.float32 for st in opt.state.values())
    extra = opt.extra_memory_bytes()
    weights = sum(p.numel() * 4 for p in params)
    assert weights <= extra <= weights + 8 * len(params), "one moving average per weight plus a counter per tensor"
    n = weights // 4
    per_weight = 1 + (6 if implementation == "eager" else 0)  # the flag; the eager chunk's float and 2 bools
    assert n <= opt.scratch_bytes() <= per_weight * n + 64 * 1024, "a one-byte flag per weight (+ eager chunks) and small tables"


@pytest.mark.parametrize("impl", ["eager", "compiled", "auto"])
def test_op_count_does_not_grow_with_the_number_of_tensors(impl):
    """A step dispatches as many aten ops for 200 tensors as for 10 of the same total size."""
    if impl == "compiled":
        pytest.importorskip("torch._inductor")
    counts = {}
    for t in (10, 200):
        g = torch.Generator().manual_seed(t)
        params = [torch.nn.Parameter(torch.randn(200_000 // t, generator=g)) for _ in range(t)]
        opt = Bop(params, ar=1e-2, tau=1e-5, implementation=impl)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g) * 1e-3
            opt.step()
        opt.zero_grad(set_to_none=False)
        for p in params:
            p.grad.add_(torch.randn(p.shape, generator=g) * 1e-3)
        with OpLog() as log:
            opt.step()
            opt.zero_grad(set_to_none=False)
        counts[t] = len(log.ops)
    assert counts[10] == counts[200] <= 40, counts


def test_parameters_gradients_and_state_are_views_of_one_buffer(implementation):
    """channels_last stays channels_last; autograd accumulates into the flat gradient buffer after
    zero_grad(set_to_none=False); the result is the formulas' on the gradients autograd produced."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, bias=False).to(memory_format=torch.channels_last)
    lin = torch.nn.Linear(8, 5, bias=False)
    params = [conv.weight, lin.weight]
    with torch.no_grad():
        conv.weight[torch.rand(conv.weight.shape) < 0.5] = 0
    w0 = [p.detach().clone() for p in params]
    opt = Bop(params, ar=0.1, tau=1e-4, init_average="first_grad", implementation=implementation)
    seen = []
    for step in range(6):
        opt.zero_grad(set_to_none=False)
        x = torch.randn(4, 3, 6, 6).to(memory_format=torch.channels_last)
        lin(conv(x).mean((2, 3))).square().sum().backward()
        seen.append([p.grad.clone() for p in params])
        grads = [p.grad for p in params]
        opt.step()
        if step:
            assert [p.grad for p in params] == grads and all(a is b for a, b in zip(grads, [p.grad for p in params]))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    for ts in (params, [p.grad for p in params], [opt.state[p]["moving_average"] for p in params], opt.flip_counts()):
        assert len({t.untyped_storage().data_ptr() for t in ts}) == 1
    ref_w, ref_m, ref_flips = reference_bop(w0, seen, lambda s: 0.1, lambda s: 1e-4, "first_grad")
    for p, w, m in zip(params, ref_w, ref_m):
        assert torch.equal(p.detach(), w) and torch.equal(opt.state[p]["moving_average"], m)
    assert [int(c) for c in opt.flip_counts()] == ref_flips and sum(ref_flips) > 0


def test_moved_parameters_are_laid_out_again(implementation):
    """`model.to(...)`, `p.data = ...` or a memory-format change after some steps: the next step
    puts the parameters back into one buffer and carries on exactly."""
    ws, grads = make_problem(steps=12)
    ar_at, tau_at = (lambda s: 1e-2), (lambda s: 1e-5)
    ref_w, ref_m, ref_flips = reference_bop(ws, grads, ar_at, tau_at, "zero")
    params = [torch.nn.Parameter(w.clone()) for w in ws]
    opt = Bop(params, ar=1e-2, tau=1e-5, implementation=implementation)
    for s, gs in enumerate(grads):
        if s == 4:
            params[1].data = params[1].data.clone()
        if s == 8:
            params[0].data = params[0].data.contiguous(memory_format=torch.channels_last)
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    assert all(torch.equal(p.detach(), w) for p, w in zip(params, ref_w))
    assert all(torch.equal(opt.state[p]["moving_average"], m) for p, m in zip(params, ref_m))
    assert [int(c) for c in opt.flip_counts()] == ref_flips
    assert params[0].is_contiguous(memory_format=torch.channels_last)
    assert len({p.untyped_storage().data_ptr() for p in params}) == 1


def test_a_tensor_without_gradient_is_skipped(implementation):
    """Tensor 0 gets no gradient at steps 0 and 3: it keeps its weights and average there, and
    (first_grad) its first step is step 1; the others step as usual."""
    ws, grads = make_problem(steps=6)
    ar_at, tau_at = (lambda s: 1e-2), (lambda s: 1e-5)
    skip = {0, 3}
    ref_w, ref_m, ref_flips = reference_bop(ws[1:], [gs[1:] for gs in grads], ar_at, tau_at, "first_grad")
    r0_w, r0_m, r0_flips = reference_bop(ws[:1], [gs[:1] for s, gs in enumerate(grads) if s not in skip], ar_at, tau_at, "first_grad")
    params = [torch.nn.Parameter(w.clone()) for w in ws]
    opt = Bop(params, ar=1e-2, tau=1e-5, init_average="first_grad", implementation=implementation)
    for s, gs in enumerate(grads):
        for k, (p, g) in enumerate(zip(params, gs)):
            p.grad = None if (k == 0 and s in skip) else g.clone()
        opt.step()
        if s == 0:
            assert "moving_average" not in opt.state[params[0]] and torch.equal(params[0].detach(), ws[0])
    assert torch.equal(params[0].detach(), r0_w[0]) and torch.equal(opt.state[params[0]]["moving_average"], r0_m[0])
    assert all(torch.equal(p.detach(), w) for p, w in zip(params[1:], ref_w))
    assert [int(c) for c in opt.flip_counts()] == r0_flips + ref_flips


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("impl", ["eager", "compiled"])
def test_cuda_bit_exact_without_synchronising(impl):
    """On a GPU: bitwise the CPU oracle's weights, averages and counts (tiny magnitudes included),
    and no step synchronises with the host (torch.cuda sync debug mode set to error)."""
    ws, grads = make_problem(steps=10)
    tw, tg = tiny_problem(steps=10)
    ws, grads = ws + tw, [a + b for a, b in zip(grads, tg)]
    ar_at, tau_at = (lambda s: 1e-2 * 0.8**s), (lambda s: 1e-5 if s < 5 else 1e-25)
    ref_w, ref_m, ref_flips = reference_bop(ws, grads, ar_at, tau_at, "first_grad")
    params = [torch.nn.Parameter(w.cuda()) for w in ws]
    opt = Bop(params, ar=ar_at(0), tau=tau_at(0), init_average="first_grad", implementation=impl)
    dgrads = [[g.cuda() for g in gs] for gs in grads]
    for s, gs in enumerate(dgrads):
        opt.set_ar(ar_at(s))
        opt.set_tau(tau_at(s))
        for p, g in zip(params, gs):
            p.grad = g.clone()
        if s:
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert opt.last_implementation == impl
    for p, w, m in zip(params, ref_w, ref_m):
        assert torch.equal(p.detach().cpu(), w) and torch.equal(opt.state[p]["moving_average"].cpu(), m)
    assert [int(c) for c in opt.flip_counts()] == ref_flips


def test_bad_parameters_are_refused():
    p = [torch.nn.Parameter(torch.ones(3))]
    for kw in ({"ar": 0.0}, {"ar": 1.0}, {"tau": -1e-6}, {"init_average": "ones"}, {"implementation": "cuda"}):
        with pytest.raises(ValueError):
            Bop(p, **kw)


def test_train_stage_writes_flip_statistics(tmp_path, write_spec):
    from pab_framework.pipeline import run_spec
    from pab_framework.progress import Reporter
    from pab_framework.specification import load_spec

    text = TINY_SPEC.replace("epochs: 2", "epochs: 3").replace(
        "optimizer: {name: bop, ar: 1.0e-3, tau: 1.0e-6}",
        "optimizer: {name: bop, ar: 1.0e-2, tau: 1.0e-6, init_average: first_grad, ar_decay: {every: 1, factor: 0.5}}",
    )
    spec = load_spec(write_spec(text))
    out = {o.stage_id: o for o in run_spec(spec, reporter=Reporter(mode="none"))}
    d = out["train"].dir
    metrics = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [m["ar"] for m in metrics] == pytest.approx([1e-2, 5e-3, 2.5e-3])
    rows = [json.loads(line) for line in (d / "flips.jsonl").read_text().splitlines()]
    layers = {r["layer"] for r in rows}
    assert layers == {"1.weight", "4.weight"}  # the MLP's two Linear weights, both masked
    assert sorted({r["epoch"] for r in rows}) == [1, 2, 3]
    for m in metrics:
        per = [r for r in rows if r["epoch"] == m["epoch"]]
        assert sum(r["flips"] for r in per) == m["flips"]
        assert m["flip_rate"] == pytest.approx(m["flips"] / sum(r["surviving"] for r in per))
        for r in per:
            assert 0 <= r["sign_changed"] <= 1 and r["flip_rate"] == pytest.approx(r["flips"] / r["surviving"])
    # sign_changed against a direct comparison of the final weights with the prune stage's
    final = torch.load(d / "model.pt", weights_only=True)["state_dict"]
    start = torch.load(out["prune"].dir / "model.pt", weights_only=True)["state_dict"]
    last = [r for r in rows if r["epoch"] == 3]
    for r in last:
        w, w0 = final[r["layer"]], start[r["layer"]]
        assert torch.equal(w.abs(), w0.abs())
        assert r["sign_changed"] == pytest.approx(float((w.sign() != w0.sign()).sum()) / r["surviving"])
