"""The CUDA paths, for anyone with a GPU: `python -m pytest tests/test_cuda.py` (every test is
skipped without CUDA; none needs a network). benchmarks/gpu_suite.py runs it with the GPU figures.
Their bodies were run on the CPU (device names swapped) while writing them; on a GPU they are
unmeasured until someone lent one runs the suite.

Bop's default implementation against the eager reference, bitwise; PSG's weight gradients on CUDA
against the CPU's, and a PSG model compiled (default and reduce-overhead) against eager; the quickstart on `runtime.device: cuda`,
and compiled with CUDA graphs (`runtime.compile: reduce-overhead`, fp32 and bf16) against eager; AMP (bf16 and fp16 with its gradient
scaler) train stages with Bop, with and without PSG; `runtime.channels_last`; two DDP processes on
one GPU over gloo, and over NCCL where two GPUs exist.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import CONFIGS, ROOT
from pab_framework import artifacts
from pab_framework.pipeline import run_spec
from pab_framework.progress import Reporter
from pab_framework.specification import load_spec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

QUICKSTART = CONFIGS / "quickstart.yaml"


@contextmanager
def no_tf32():
    """Full fp32 matmuls and convolutions (TF32 would make every CUDA figure differ from the CPU's by ~1e-3)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def run(config: Path, tmp_path: Path, *sets: str):
    """Run a spec in this process on CUDA; {stage id: outcome}."""
    spec = load_spec(config, ["runtime.device=cuda", f"runtime.output_dir={tmp_path}", "runtime.progress=none", *sets])
    return {o.stage_id: o for o in run_spec(spec, reporter=Reporter(mode="none"))}


def pab(*args, timeout=600):
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "pab_framework", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ------------------------------------------------------------------ Bop
def _resnet50_shapes() -> list[tuple[int, ...]]:
    import torchvision

    return [tuple(p.shape) for m in torchvision.models.resnet50().modules() if isinstance(m, (nn.Conv2d, nn.Linear))
            for p in [m.weight]]


def _bop_run(shapes, implementation: str, steps: int, init_average: str, seed: int = 0):
    """`steps` Bop steps on CUDA from seeded weights (a third pruned to zero) and gradients; the
    weights, flip counts and state after every step, on the host."""
    from pab_plugins.optimizers.bop_optim import Bop

    g = torch.Generator().manual_seed(seed)
    ws = []
    for s in shapes:
        w = torch.randn(s, generator=g) * 0.05
        w[torch.rand(s, generator=g) < 1 / 3] = 0.0
        ws.append(nn.Parameter(w.cuda()))
    opt = Bop(ws, ar=0.1, tau=1e-3, init_average=init_average, implementation=implementation)
    trace = []
    for k in range(steps):
        for w in ws:
            w.grad = (torch.randn(w.shape, generator=g) * 0.01).cuda()
        if k == steps // 2:  # the schedule changes mid-run, as ar_decay does
            opt.set_ar(0.015)
        opt.step()
        trace.append(([w.detach().cpu().clone() for w in ws], [c.cpu().clone() for c in opt.flip_counts()]))
    return trace, opt.state_dict()


def _state_equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a.cpu(), b.cpu())
    return a == b


@pytest.mark.parametrize("init_average", ["first_grad", "zero"])
@pytest.mark.parametrize("params, implementation", [
    ("small", "auto"),          # the default below the fused-step size
    ("small", "compiled"),      # the fused step, forced
    ("resnet50", "auto"),       # the default on ResNet-50's parameter set (25.6 M weights, 54 tensors)
])
def test_bop_default_is_bitwise_the_eager_reference(params, implementation, init_average):
    shapes = [(64, 3, 3, 3), (64, 64, 3, 3), (128, 64, 1, 1), (10, 512), (7,), (1, 1, 1, 1)] if params == "small" else _resnet50_shapes()
    ref, ref_state = _bop_run(shapes, "eager", 6, init_average)
    got, got_state = _bop_run(shapes, implementation, 6, init_average)
    for k, ((rw, rc), (gw, gc)) in enumerate(zip(ref, got)):
        assert all(torch.equal(a, b) for a, b in zip(rw, gw)), f"weights differ after step {k + 1}"
        assert all(torch.equal(a, b) for a, b in zip(rc, gc)), f"flip counts differ after step {k + 1}"
    assert sum(int(c.sum()) for c in ref[-1][1]) > 0  # the run flipped something
    assert _state_equal(ref_state, got_state)  # moving averages and counters


# ------------------------------------------------------------------ PSG
def _psg_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str) -> dict[str, torch.Tensor]:
    m = copy.deepcopy(model).to(device)
    loss = nn.functional.cross_entropy(m(x.to(device)), y.to(device))
    loss.backward()
    return {n: p.grad.detach().cpu() for n, p in m.named_parameters() if p.grad is not None and n.endswith("weight") and p.dim() > 1}


def test_psg_gradients_on_cuda_equal_the_cpus():
    """Low-precision weight gradients (4-bit inputs, 8-bit output gradients, so PSG's effect is
    large) on CUDA against the CPU, layer by layer, ten times closer than PSG's own deviation from
    full precision. (Not closer: the convolutions sum in another order on each device, and a value
    that lands on the other side of a rounding boundary moves a code by one step; on the CPU alone,
    scaling the input by 1 + 1e-6 moves layer4.1.conv2's gradient by 2.3e-3 of its norm.)"""
    from pab_framework.modelutil import prunable_parameters
    from pab_plugins.models.resnet_cifar import cifar_resnet18
    from pab_framework.transforms import TransformContext
    from pab_plugins.quantizers.psg import PSG

    torch.manual_seed(0)
    dense = cifar_resnet18(width=16)
    model = copy.deepcopy(dense)
    model = PSG().apply(model, PSG.Params(msb_bits=4, msb_bits_grad=8, threshold=1e-3), TransformContext.of(model, set(prunable_parameters(dense))))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    with no_tf32():
        cpu, cuda = _psg_grads(model, x, y, "cpu"), _psg_grads(model, x, y, "cuda")
        full = _psg_grads(dense, x, y, "cpu")
    assert cpu.keys() == cuda.keys() and len(cpu) == 21
    for n in cpu:
        psg_effect = float((full[n] - cpu[n]).norm())
        assert psg_effect > 1e-2 * float(full[n].norm()), n  # PSG changes every layer's gradient...
        assert float((cuda[n] - cpu[n]).norm()) <= 0.1 * psg_effect, n  # ...and CUDA computes the same change


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_psg_compiled_on_cuda_trains_as_eager(mode):
    """A cifar_resnet18 with PSG compiled (Inductor; CUDA graphs with reduce-overhead), the Triton
    kernels inside PSG's registered operator: three steps' gradients and the kept counts as eager
    (up to Inductor's reordered sums, which move a few quantisation codes)."""
    from pab_framework.modelutil import prunable_parameters
    from pab_plugins.models.resnet_cifar import cifar_resnet18
    from pab_framework.transforms import TransformContext
    from pab_plugins.quantizers.psg import PSG

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = cifar_resnet18(width=16).cuda()
    PSG().apply(eager, PSG.Params(), TransformContext.of(eager, set(prunable_parameters(eager))))
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, mode=mode)
    g = torch.Generator().manual_seed(1)
    with no_tf32():
        for step in range(3):
            x, y = torch.randn(8, 3, 32, 32, generator=g).cuda(), torch.randint(0, 10, (8,), generator=g).cuda()
            for net, forward in ((eager, eager), (model, compiled)):
                net.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(forward(x), y).backward()
            for (n, a), b in zip(eager.named_parameters(), model.parameters()):
                assert float((a.grad - b.grad).norm()) <= 1e-3 * float(a.grad.norm()) + 1e-6, (step, n)
    want, got = PSG().stats(eager), PSG().stats(model)
    assert want.keys() == got.keys() and len(want) == 21
    for k in want:
        assert got[k]["total"] == want[k]["total"] == 3 * eager.get_parameter(k).numel(), k
        assert abs(got[k]["kept"] - want[k]["kept"]) <= 1e-3 * want[k]["total"], k
    torch._dynamo.reset()


# ------------------------------------------------------------------ whole runs
def test_quickstart_on_cuda(tmp_path):
    out = run(QUICKSTART, tmp_path)
    assert out["train"].result["val_acc"] >= 0.97
    rows = artifacts.read_jsonl(out["train"].dir / "metrics.jsonl")
    assert rows[0]["flips"] > 0 and "psg_kept" in rows[-1]


# the quickstart made short (4 epochs, 20 pruning rounds): above 0.96 on the CPU in fp32 and bf16
SHORT = ["stages.train.epochs=4", "stages.prune.pruner.iterations=20", "stages.train.optimizer.ar_decay={every: 2, factor: 0.15}"]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("psg", [False, True], ids=["bop", "bop+psg"])
def test_amp_train_stage(tmp_path, amp, psg):
    """Autocast forward passes (fp16 with the gradient scaler) train with Bop, and with PSG's
    low-precision weight gradients."""
    sets = [*SHORT, f"runtime.amp={amp}"] + ([] if psg else ["stages.train.quantizer=null"])
    out = run(QUICKSTART, tmp_path, *sets)
    res = out["train"].result
    rows = artifacts.read_jsonl(out["train"].dir / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)
    assert rows[0]["flips"] > 0
    assert res["val_acc"] >= 0.9, res
    if psg:
        assert 0 < rows[-1]["psg_kept"] <= 1


def test_channels_last(tmp_path):
    """channels_last model and batches train as the default layout does (up to float rounding)."""
    sets = SHORT
    with no_tf32():
        plain = run(QUICKSTART, tmp_path / "plain", *sets)
        last = run(QUICKSTART, tmp_path / "last", *sets, "runtime.channels_last=true")
    _, m1 = artifacts.load_model_artifact(plain["prune"].dir / "model.pt")
    _, m2 = artifacts.load_model_artifact(last["prune"].dir / "model.pt")
    assert all(torch.equal(m1[k], m2[k]) for k in m1)  # pruning does not depend on the layout
    assert last["train"].result["val_acc"] >= 0.9
    assert abs(last["train"].result["val_acc"] - plain["train"].result["val_acc"]) <= 0.05


def _two_processes(tmp_path, backend: str):
    p = pab("run", QUICKSTART, "--nproc", 2, "--progress", "plain", "--set", "runtime.device=cuda", "--set", f"runtime.backend={backend}",
            "--set", f"runtime.output_dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    (train,) = (tmp_path / "quickstart").glob("train-*")
    res = json.loads((train / "result.json").read_text())
    assert res["world_size"] == 2 and all(len(set(d)) == 1 for d in res["rank_digests"].values())  # the ranks agree bitwise
    assert res["val_acc"] >= 0.97


def test_ddp_two_processes_one_gpu_gloo(tmp_path):
    _two_processes(tmp_path, "gloo")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per process: two GPUs")
def test_ddp_two_processes_nccl(tmp_path):
    _two_processes(tmp_path, "nccl")


# last: the longest (compiles), so a suite out of time cuts it rather than the others
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_quickstart_compiled_with_cuda_graphs(tmp_path, monkeypatch, amp):
    """runtime.compile: reduce-overhead (CUDA graphs, PSG's Triton kernels inside its operator) on
    the short quickstart: val_acc as eager within 0.01, compile_s recorded, model.pt with the eager
    keys, nothing compiled after the first epoch (no recompile, no new graph)."""
    import pab_faults
    from torch._dynamo.utils import counters

    sets = [*SHORT, f"runtime.amp={amp}"]
    with no_tf32():
        eager = run(QUICKSTART, tmp_path / "eager", *sets)
        torch._dynamo.reset()
        graphs = []
        pab_faults.at("epoch-end", 1, lambda trainer: graphs.append(counters["stats"]["unique_graphs"]), monkeypatch.setattr)
        comp = run(QUICKSTART, tmp_path / "compiled", *sets, "runtime.compile=reduce-overhead")
    assert graphs and counters["stats"]["unique_graphs"] == graphs[0] >= 2
    res = comp["train"].result
    assert res["compile_s"] > 0 and abs(res["val_acc"] - eager["train"].result["val_acc"]) <= 0.01
    s1, _ = artifacts.load_model_artifact(comp["train"].dir / "model.pt")
    s2, _ = artifacts.load_model_artifact(eager["train"].dir / "model.pt")
    assert list(s1) == list(s2)
    torch._dynamo.reset()
