"""Bop: bit-exact against a direct implementation of its formulas, resumable, and its statistics."""
import json

import pytest
import torch

from plugins.optimizers.bop_optim import Bop
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


@pytest.mark.parametrize("init_average", ["zero", "first_grad"])
@pytest.mark.parametrize("decay", [False, True])
def test_bit_exact_against_the_formulas(init_average, decay):
    ws, grads = make_problem(seed=1 if decay else 0)
    ar_at = (lambda s: 1e-2 * (0.5 ** (s // 10))) if decay else (lambda s: 1e-2)
    tau_at = (lambda s: 1e-5 * (0.3 ** (s // 20))) if decay else (lambda s: 1e-5)
    ref_w, ref_m, ref_flips = reference_bop(ws, grads, ar_at, tau_at, init_average)
    params, opt = run_ours(ws, grads, ar_at, tau_at, init_average)
    for p, w, m, w0 in zip(params, ref_w, ref_m, ws):
        assert torch.equal(p.detach(), w)
        assert torch.equal(opt.state[p]["moving_average"], m)
        assert torch.equal(p.detach().abs(), w0.abs()), "magnitudes never change"
        assert torch.equal(p.detach() == 0, w0 == 0), "zeros stay zero"
    assert [int(c) for c in opt.flip_counts()] == ref_flips
    assert sum(ref_flips) > 100, "the problem should make Bop flip"
    changed = sum(int((p.detach() != w0).sum()) for p, w0 in zip(params, ws))
    assert 0 < changed < sum(int((w0 != 0).sum()) for w0 in ws)


def test_compiled_step_matches_the_formulas():
    pytest.importorskip("torch._inductor")
    ws, grads = make_problem(steps=5)
    ref_w, ref_m, ref_flips = reference_bop(ws, grads, lambda s: 1e-2, lambda s: 1e-5, "zero")
    params, opt = run_ours(ws, grads, lambda s: 1e-2, lambda s: 1e-5, "zero", implementation="compiled")
    for p, w, m in zip(params, ref_w, ref_m):
        torch.testing.assert_close(opt.state[p]["moving_average"], m, rtol=1e-6, atol=1e-12)
        # a flip decided by a rounding difference at |m| == tau is possible; allow a handful
        assert int((p.detach() != w).sum()) <= 3
    assert abs(sum(int(c) for c in opt.flip_counts()) - sum(ref_flips)) <= 3


def test_save_load_continue_equals_never_stopping():
    ws, grads = make_problem(steps=30)
    ar_at, tau_at = (lambda s: 1e-2), (lambda s: 1e-5)
    straight, _ = run_ours(ws, grads, ar_at, tau_at, "first_grad")

    first, opt = run_ours(ws, grads[:12], ar_at, tau_at, "first_grad")
    state = opt.state_dict()
    import io
    buf = io.BytesIO()
    torch.save({"w": [p.detach() for p in first], "opt": state}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # what the checkpoint loader does
    params = [torch.nn.Parameter(w.clone()) for w in saved["w"]]
    opt2 = Bop(params, ar=1e-2, tau=1e-5, init_average="first_grad", implementation="eager")
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


def test_step_does_not_synchronise_or_use_float64(monkeypatch):
    ws, grads = make_problem(steps=2)
    params = [torch.nn.Parameter(w.clone()) for w in ws]
    opt = Bop(params, ar=1e-2, tau=1e-5, implementation="eager")

    def boom(*a, **k):
        raise AssertionError("a host sync inside Bop.step")

    for p, g in zip(params, grads[0]):
        p.grad = g
    monkeypatch.setattr(torch.Tensor, "item", boom)
    monkeypatch.setattr(torch.Tensor, "tolist", boom)
    monkeypatch.setattr(torch.Tensor, "__bool__", boom)
    opt.step()
    monkeypatch.undo()
    assert all(st["moving_average"].dtype == torch.float32 for st in opt.state.values())
    extra = opt.extra_memory_bytes()
    weights = sum(p.numel() * 4 for p in params)
    assert weights <= extra <= weights + 8 * len(params), "one moving average per weight plus a counter per tensor"


def test_bad_parameters_are_refused():
    p = [torch.nn.Parameter(torch.ones(3))]
    for kw in ({"ar": 0.0}, {"ar": 1.0}, {"tau": -1e-6}, {"init_average": "ones"}, {"implementation": "cuda"}):
        with pytest.raises(ValueError):
            Bop(p, **kw)


def test_train_stage_writes_flip_statistics(tmp_path, write_spec):
    from pab_framework.pipeline import run_spec
    from pab_framework.progress import Reporter
    from pab_framework.spec import load_spec

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
