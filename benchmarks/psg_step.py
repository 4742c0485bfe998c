"""One PaB training step (forward, backward, Bop step) of cifar_resnet18, batch 32, CIFAR-shaped, CPU.

In one process, on the same model and data:
  (a) plain       - full precision;
  (b) psg         - our PSG (plugins/quantizers/psg.py): one conv forward, input gradient at full
                    precision, weight gradient from 8-bit inputs and 16-bit output gradients;
  (c) two_branch  - PSG written the way the original code does it: a full-precision branch and a
                    low-precision (MSB) branch, each a full convolution in the forward pass, three
                    in the backward pass, the two weight gradients combined afterwards.
Also the bytes that the conv/linear layers keep for backward (saved_tensors_hooks), for (a) and (b).
Medians of --reps steps after a warm-up. The last line is one JSON object.

    python benchmarks/psg_step.py [--reps 10] [--batch 32]
"""
from __future__ import annotations

import argparse
import copy
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
from plugins.models.resnet_cifar import cifar_resnet18  # noqa: E402
from plugins.optimizers.bop_optim import Bop  # noqa: E402
from pab_framework.transforms import TransformContext  # noqa: E402
from plugins.quantizers.psg import PSG  # noqa: E402
from plugins.quantizers.psg_ops import input_range, quantize_signed_whole  # noqa: E402


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


def layer_saved_bytes(model: nn.Module, x, y) -> int:
    """Bytes saved for backward inside the prunable Conv2d/Linear layers during one forward."""
    inside = [False]
    total = [0]
    seen = set()

    def pack(t):
        if inside[0] and not isinstance(t, nn.Parameter) and id(t) not in seen:
            seen.add(id(t))
            total[0] += t.numel() * t.element_size()
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
    return total[0]


def time_steps(model, x, y, reps: int) -> float:
    masked = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    bop = Bop(masked, ar=1e-3, tau=1e-6, implementation="eager")
    sgd = torch.optim.SGD(rest, lr=0.1, momentum=0.9)

    def step():
        bop.zero_grad(set_to_none=True)
        sgd.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        bop.step()
        sgd.step()

    step()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        ts.append((time.perf_counter() - t) * 1000)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
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

    saved_plain = layer_saved_bytes(plain, x, y)
    saved_psg = layer_saved_bytes(ours, x, y)
    # interleave the three so that machine noise hits them alike
    plain_ms, psg_ms, two_ms = [], [], []
    for _ in range(3):
        plain_ms.append(time_steps(plain, x, y, a.reps))
        psg_ms.append(time_steps(ours, x, y, a.reps))
        two_ms.append(time_steps(branch, x, y, a.reps))
    plain_ms, psg_ms, two_ms = (statistics.median(v) for v in (plain_ms, psg_ms, two_ms))
    overhead, speedup = psg_ms / plain_ms, two_ms / psg_ms
    print(f"cifar_resnet18, batch {a.batch}, density 0.3, CPU {torch.get_num_threads()} threads; ms per step (fwd+bwd+Bop), median")
    print(f"  (a) plain full precision   {plain_ms:8.1f} ms")
    print(f"  (b) PSG (ours)             {psg_ms:8.1f} ms   b/a = {overhead:.2f}  (goal <= 1.3)")
    print(f"  (c) two-branch PSG         {two_ms:8.1f} ms   c/b = {speedup:.2f}  (goal >= 1.5)")
    print(f"  saved for backward by the conv/linear layers: plain {saved_plain / 2**20:.1f} MiB, "
          f"PSG {saved_psg / 2**20:.1f} MiB ({saved_psg / saved_plain:.2f} of plain; goal <= 0.33)")
    print(json.dumps({"plain_ms": round(plain_ms, 2), "psg_ms": round(psg_ms, 2), "two_branch_ms": round(two_ms, 2),
                      "overhead": round(overhead, 3), "speedup": round(speedup, 3),
                      "saved_bytes_plain": saved_plain, "saved_bytes_psg": saved_psg}))


if __name__ == "__main__":
    main()
