"""One PaB training step with and without PSG: time, memory, and (CPU) the original two-branch way.

Without --device (the CPU figures this file has always given): cifar_resnet18, batch 32,
CIFAR-shaped, on the CPU, in one process, on the same model and data:
  (a) plain       - full precision;
  (b) psg         - our PSG (plugins/quantizers/psg.py): the plain forward and input gradient,
                    the weight gradient from 8-bit inputs and 16-bit output gradients;
  (c) two_branch  - PSG written the way the original code does it: a full-precision branch and a
                    low-precision (MSB) branch, each a full convolution in the forward pass, three
                    in the backward pass, the two weight gradients combined afterwards.
One step = forward, backward, Bop step on the prunable weights (30% kept). Also what is kept for
backward: by the conv/linear layers (saved_tensors_hooks inside them), and by the whole step
(distinct storages), for (a) and (b). Medians of --reps steps after a warm-up.

With --device DEV (cuda: the GPU figures): for cifar_resnet18 (batch 128, 32x32) and torchvision's
resnet50 (batch 64, 224x224), in fp32 and under bf16 autocast, plain and PSG: one step = forward,
backward, Bop on the masked weights (50% random masks) and SGD (momentum) on the rest; the median
of --reps steps after --warmup, each step timed between two device synchronisations; on CUDA the
peak memory of the step (torch.cuda.max_memory_allocated, reset for every case, each case on its
own fresh model). `--tiny` shrinks the shapes to check the logic on a CPU.

With --compile MODE (torch.compile's mode; default none) the plain and the PSG model are also
compiled the same way: on the CPU figures both are timed compiled beside their eager runs (goals:
compiled PSG <= 1.15 x compiled plain, compiled PSG <= eager PSG), with the first, compiling
step's seconds; with --device every case runs compiled (compiled in the warm-up).

The last line is one JSON object.

    python benchmarks/psg_step.py [--reps 10] [--batch 32] [--compile default]
    python benchmarks/psg_step.py --device cuda [--reps 20] [--warmup 5] [--compile reduce-overhead]
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pab_framework.modelutil import apply_masks_, prunable_parameters  # noqa: E402
from pab_plugins.models.resnet_cifar import cifar_resnet18  # noqa: E402
from pab_plugins.optimizers.bop_optim import Bop  # noqa: E402
from pab_framework.transforms import TransformContext  # noqa: E402
from pab_plugins.quantizers import psg_ops  # noqa: E402
from pab_plugins.quantizers.psg import PSG  # noqa: E402


# ----------------------------------------------------------------------------- the original code's way
def input_range(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, delta) for x: per-sample max|x| averaged over the batch; [0, max] if x >= 0 everywhere."""
    flat = x.detach().reshape(x.shape[0], -1)
    mins, maxs = torch.aminmax(flat, dim=1)
    mx = torch.maximum(mins.abs(), maxs.abs()).mean()
    lo = torch.where(mins.min() < 0, -mx, torch.zeros_like(mx))
    delta = (mx - lo) / 2.0**bits
    return lo, torch.where(delta > 0, delta, torch.ones_like(delta))


def quantize_signed_whole(g: torch.Tensor, bits: int) -> torch.Tensor:
    mx = g.detach().abs().amax()
    delta = 2 * mx / 2.0**bits
    delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    return (g + mx).div_(delta).clamp_(0, 2.0**bits - 1).round_().mul_(delta).sub_(mx)


class _QuantGrad(torch.autograd.Function):
    """Identity forward; the gradient quantised on the way back (the original's quantize_grad)."""

    @staticmethod
    def forward(ctx, x, bits):
        ctx.bits = bits
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return quantize_signed_whole(g, ctx.bits), None


class _Combine(torch.autograd.Function):
    """Two views of the weight; backward merges their gradients with the threshold (relative, sparsify)."""

    @staticmethod
    def forward(ctx, w, threshold):
        ctx.threshold = threshold
        return w.view_as(w), w.detach().clone()

    @staticmethod
    def backward(ctx, g_full, g_msb):
        keep = (g_msb.abs() >= ctx.threshold * g_msb.abs().max()).float()
        return keep * g_msb, None


class TwoBranchConv(nn.Conv2d):
    def forward(self, x):
        w_full, w_msb = _Combine.apply(self.weight, 1e-7)
        out = F.conv2d(x, w_full, self.bias, self.stride, self.padding, self.dilation, self.groups)
        lo, delta = input_range(x, 8)
        xq = ((x.detach() - lo) / delta).clamp(0, 255).round() * delta + lo
        msb = F.conv2d(xq, w_msb.requires_grad_(), None, self.stride, self.padding, self.dilation, self.groups)
        msb = _QuantGrad.apply(msb, 16)
        return out + msb - msb.detach()  # the value of `out`, and gradients through both branches


class TwoBranchLinear(nn.Linear):
    def forward(self, x):
        w_full, w_msb = _Combine.apply(self.weight, 1e-7)
        out = F.linear(x, w_full, self.bias)
        lo, delta = input_range(x, 8)
        xq = ((x.detach() - lo) / delta).clamp(0, 255).round() * delta + lo
        msb = _QuantGrad.apply(F.linear(xq, w_msb.requires_grad_()), 16)
        return out + msb - msb.detach()


def two_branch(model: nn.Module, prunable: set[str]) -> nn.Module:
    for name, m in model.named_modules():
        if f"{name}.weight" in prunable:
            m.__class__ = TwoBranchConv if isinstance(m, nn.Conv2d) else TwoBranchLinear
    return model


# ----------------------------------------------------------------------------- CPU figures
def saved_bytes(model: nn.Module, x, y) -> tuple[int, int]:
    """Bytes kept for backward during one forward: (inside the prunable Conv2d/Linear layers,
    by the whole step counting each storage once). Parameters are not counted."""
    inside = [False]
    layer_total = [0]
    seen, storages = set(), {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
            if inside[0] and id(t) not in seen:
                seen.add(id(t))
                layer_total[0] += t.numel() * t.element_size()
        return t

    hooks = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True)))
            hooks.append(m.register_forward_hook(lambda *a: inside.__setitem__(0, False)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    return layer_total[0], sum(storages.values())


def time_steps(model, x, y, reps: int, forward=None) -> tuple[float, float]:
    """Median ms of `reps` steps after one untimed step, and that first step's seconds (with
    --compile: the compilation). `forward`: what runs the model (a compiled `model`), default itself."""
    forward = model if forward is None else forward
    masked = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    bop = Bop(masked, ar=1e-3, tau=1e-6, implementation="eager")
    sgd = torch.optim.SGD(rest, lr=0.1, momentum=0.9)

    def step():
        bop.zero_grad(set_to_none=True)
        sgd.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x), y).backward()
        bop.step()
        sgd.step()

    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        ts.append((time.perf_counter() - t) * 1000)
    return statistics.median(ts), first


def cpu_figures(a) -> None:
    torch.manual_seed(0)
    base = cifar_resnet18()
    masks = {n: torch.rand_like(w) < 0.3 for n, w in prunable_parameters(base).items()}
    apply_masks_(prunable_parameters(base), masks)
    x = torch.randn(a.batch, 3, 32, 32)
    y = torch.randint(0, 10, (a.batch,))

    plain = copy.deepcopy(base)
    work = copy.deepcopy(base)
    ours = PSG().apply(work, PSG.Params(), TransformContext.of(work, set(masks)))
    branch = two_branch(copy.deepcopy(base), set(masks))

    layer_plain, step_plain = saved_bytes(plain, x, y)
    layer_psg, step_psg = saved_bytes(ours, x, y)
    compiled = {}
    if a.compile != "none":  # the same modules, compiled the same way (they share their parameters)
        compiled = {"plain": torch.compile(plain, mode=a.compile), "psg": torch.compile(ours, mode=a.compile)}
    # interleave the variants so that machine noise hits them alike
    ms = {k: [] for k in ("plain", "psg", "two_branch", *(f"compiled_{k}" for k in compiled))}
    first_s = {}
    for _ in range(3):
        ms["plain"].append(time_steps(plain, x, y, a.reps)[0])
        ms["psg"].append(time_steps(ours, x, y, a.reps)[0])
        ms["two_branch"].append(time_steps(branch, x, y, a.reps)[0])
        for k, fwd in compiled.items():
            t, first = time_steps(plain if k == "plain" else ours, x, y, a.reps, forward=fwd)
            ms[f"compiled_{k}"].append(t)
            first_s.setdefault(k, first)  # the first call compiles
    med = {k: statistics.median(v) for k, v in ms.items()}
    plain_ms, psg_ms, two_ms = med["plain"], med["psg"], med["two_branch"]
    overhead, speedup = psg_ms / plain_ms, two_ms / psg_ms
    print(f"cifar_resnet18, batch {a.batch}, density 0.3, CPU {torch.get_num_threads()} threads; ms per step (fwd+bwd+Bop), median")
    print(f"  (a) plain full precision   {plain_ms:8.1f} ms")
    print(f"  (b) PSG (ours)             {psg_ms:8.1f} ms   b/a = {overhead:.2f}  (goal <= 1.15)")
    print(f"  (c) two-branch PSG         {two_ms:8.1f} ms   c/b = {speedup:.2f}  (goal >= 1.5)")
    out = {"plain_ms": round(plain_ms, 2), "psg_ms": round(psg_ms, 2), "two_branch_ms": round(two_ms, 2),
           "overhead": round(overhead, 3), "speedup": round(speedup, 3)}
    if compiled:
        c_plain, c_psg = med["compiled_plain"], med["compiled_psg"]
        print(f"  compiled (mode {a.compile}): plain {c_plain:.1f} ms, PSG {c_psg:.1f} ms   PSG/plain = {c_psg / c_plain:.2f} "
              f"(goal <= 1.15); PSG compiled/eager = {c_psg / psg_ms:.2f} (goal <= 1); first step (compiling): "
              f"plain {first_s['plain']:.1f} s, PSG {first_s['psg']:.1f} s")
        out.update({"compile": a.compile, "compiled_plain_ms": round(c_plain, 2), "compiled_psg_ms": round(c_psg, 2),
                    "compiled_overhead": round(c_psg / c_plain, 3), "psg_compiled_vs_eager": round(c_psg / psg_ms, 3),
                    "compile_s_plain": round(first_s["plain"], 1), "compile_s_psg": round(first_s["psg"], 1)})
    print(f"  kept for backward by the whole step: plain {step_plain / 2**20:.1f} MiB, PSG {step_psg / 2**20:.1f} MiB "
          f"({step_psg / step_plain:.2f} of plain; goal <= 1)")
    print(f"  of which saved inside the conv/linear layers: plain {layer_plain / 2**20:.1f} MiB, PSG {layer_psg / 2**20:.1f} MiB "
          f"({layer_psg / layer_plain:.2f}: the same tensors, most of them kept by the ReLUs anyway)")
    out.update({"saved_bytes_plain": layer_plain, "saved_bytes_psg": layer_psg, "step_saved_bytes_plain": step_plain,
                "step_saved_bytes_psg": step_psg, "step_saved_ratio": round(step_psg / step_plain, 4)})
    print(json.dumps(out))


# ----------------------------------------------------------------------------- device figures
def _models(tiny: bool):
    """(name, build(), batch, image size, classes)."""
    import torchvision

    if tiny:
        from torchvision.models.resnet import Bottleneck, ResNet

        # the same code paths (torchvision's bottleneck ResNet, in-place ReLUs, max-pool) with one block a stage
        # (width 8: torch 2.14.1 Inductor on the CPU corrupts the heap in the backward of a width-4 cifar_resnet18)
        return [("cifar_resnet18", lambda: cifar_resnet18(width=8), 2, 32, 10),
                ("resnet50", lambda: ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10), 2, 32, 10)]
    return [("cifar_resnet18", lambda: cifar_resnet18(), 128, 32, 10),
            ("resnet50", lambda: torchvision.models.resnet50(), 64, 224, 1000)]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _case(*args):
    """Median ms of one step and the peak memory (MiB, CUDA) of a fresh model, freed afterwards."""
    out = _measure(*args)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def _measure(build, psg: bool, batch: int, size: int, classes: int, bf16: bool, dev: torch.device, warmup: int, reps: int,
             compile_mode: str):
    torch.manual_seed(0)
    model = build().to(dev)
    prunable = prunable_parameters(model)
    masks = {n: torch.rand_like(w) < 0.5 for n, w in prunable.items()}
    apply_masks_(prunable, masks)
    if psg:
        PSG().apply(model, PSG.Params(), TransformContext.of(model, set(masks)))
    forward = model if compile_mode == "none" else torch.compile(model, mode=compile_mode)  # (compiled in the warm-up)
    masked = [p for n, p in model.named_parameters() if n in masks]
    rest = [p for n, p in model.named_parameters() if n not in masks]
    bop = Bop(masked, ar=1e-3, tau=1e-6, implementation="eager")
    sgd = torch.optim.SGD(rest, lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.randint(0, classes, (batch,), device=dev)

    def step():
        bop.zero_grad(set_to_none=True)
        sgd.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        bop.step()
        sgd.step()

    for _ in range(warmup):
        step()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    ts = []
    for _ in range(reps):
        _sync(dev)
        t = time.perf_counter()
        step()
        _sync(dev)
        ts.append((time.perf_counter() - t) * 1000)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    path = psg_ops.path_for(x, torch.float32).name if psg else None
    return statistics.median(ts), peak, path


def device_figures(a) -> None:
    dev = torch.device(a.device)
    rows, paths = [], set()
    name_of = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    compiled = "" if a.compile == "none" else f", models compiled (mode {a.compile})"
    print(f"one step (forward, backward, Bop on 50%-masked weights, SGD on the rest), median of {a.reps} after {a.warmup}; "
          f"{name_of}, torch {torch.__version__}{compiled}")
    print(f"{'model':<16}{'batch':>6}{'image':>7}  {'precision':<9}{'plain ms':>10}{'PSG ms':>10}{'PSG/plain':>11}"
          f"{'plain MiB':>11}{'PSG MiB':>10}{'ratio':>7}")
    for name, build, batch, size, classes in _models(a.tiny):
        for prec in ("fp32", "bf16"):
            bf16 = prec == "bf16"
            p_ms, p_peak, _ = _case(build, False, batch, size, classes, bf16, dev, a.warmup, a.reps, a.compile)
            q_ms, q_peak, path = _case(build, True, batch, size, classes, bf16, dev, a.warmup, a.reps, a.compile)
            paths.add(path)
            row = {"model": name, "batch": batch, "image": size, "precision": prec, "plain_ms": round(p_ms, 3),
                   "psg_ms": round(q_ms, 3), "ratio": round(q_ms / p_ms, 3),
                   "plain_peak_mib": None if p_peak is None else round(p_peak, 1),
                   "psg_peak_mib": None if q_peak is None else round(q_peak, 1),
                   "peak_ratio": None if p_peak is None else round(q_peak / p_peak, 4)}
            rows.append(row)
            mem = (f"{p_peak:11.0f}{q_peak:10.0f}{q_peak / p_peak:7.3f}" if p_peak is not None else f"{'-':>11}{'-':>10}{'-':>7}")
            print(f"{name:<16}{batch:>6}{size:>7}  {prec:<9}{p_ms:10.2f}{q_ms:10.2f}{q_ms / p_ms:11.3f}{mem}", flush=True)
    worst = max(r["ratio"] for r in rows)
    peaks = [r["peak_ratio"] for r in rows if r["peak_ratio"] is not None]
    print(f"worst PSG/plain time {worst:.3f} (goal <= 1.15)" + (f"; worst peak memory ratio {max(peaks):.3f} (goal <= 1)" if peaks else ""))
    print(json.dumps({"device": name_of, "torch": torch.__version__, "compile": a.compile, "psg_path": sorted(paths), "reps": a.reps,
                      "warmup": a.warmup,
                      "rows": rows, "max_ratio": worst, "max_peak_ratio": max(peaks) if peaks else None}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="run the device figures on this device (cuda, cpu); without it, the CPU figures")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per case (default 10 on the CPU figures, 20 with --device)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (--device)")
    ap.add_argument("--batch", type=int, default=32, help="batch of the CPU figures")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (--device): checks the logic, measures nothing useful")
    ap.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                    help="also compile the plain and the PSG model this way (torch.compile's mode) and give their ratio")
    a = ap.parse_args()
    if a.device is None:
        a.reps = a.reps or 10
        cpu_figures(a)
    else:
        a.reps = a.reps or 20
        device_figures(a)


if __name__ == "__main__":
    main()
