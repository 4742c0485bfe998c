"""Milliseconds per Bop step on ResNet-50's parameter set (about 25.6 M weights), on the CPU.

In one process, on the same tensors and random gradients:
  (a) loop   - a straightforward per-tensor Python loop, the way the original PaB code steps:
               float64 flip masks and a `.item()` per tensor every step;
  (b) ours   - plugins.optimizers.bop_optim.Bop (eager, and compiled where Inductor works);
  (c) floor  - one `torch._foreach_add_` over the same tensors: the memory-bandwidth floor.
Prints a table, then the ratios a/b (goal >= 5) and b/c (goal <= 3), and as its last line one JSON
object. Median of --reps repetitions after a warm-up (the compiled step compiles in the warm-up).

    python benchmarks/bop_step.py [--reps 7] [--implementation auto|eager|compiled] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from plugins.optimizers.bop_optim import Bop  # noqa: E402


def loop_step(ws, gs, ms, ar, tau, counts):
    """The original's style: one tensor at a time, float64 masks, a host read per tensor."""
    for i, (w, g) in enumerate(zip(ws, gs)):
        m = ms[i]
        m.mul_(1 - ar).add_(g * ar)
        mask = ((m.abs() >= tau) & (torch.sign(m) == torch.sign(w))).double()
        w.mul_((1 - 2 * mask).to(w.dtype))
        counts[i] += int(mask.sum().item())


def timeit(fn, reps: int, device: str) -> float:
    fn()  # warm-up (allocations, compilation)
    ts = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1000)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--implementation", default="auto", choices=["auto", "eager", "compiled"])
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.manual_seed(0)
    shapes = [p.shape for p in torchvision.models.resnet50().parameters()]
    dev = a.device
    n = sum(torch.Size(s).numel() for s in shapes)

    def fresh():
        ws = [torch.randn(s, device=dev) for s in shapes]
        gs = [torch.randn(s, device=dev) * 1e-3 for s in shapes]
        return ws, gs

    ws, gs = fresh()
    ms = [torch.zeros_like(w) for w in ws]
    counts = [0] * len(ws)
    loop_ms = timeit(lambda: loop_step(ws, gs, ms, 1e-3, 1e-6, counts), a.reps, dev)

    ws, gs = fresh()
    params = [torch.nn.Parameter(w) for w in ws]
    for p, g in zip(params, gs):
        p.grad = g
    opt = Bop(params, ar=1e-3, tau=1e-6, implementation=a.implementation)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ours_ms = timeit(opt.step, a.reps, dev)
    used = "compiled" if opt._use_compiled(params) and opt.implementation != "eager" else "eager"
    state_bytes = opt.extra_memory_bytes()

    ws, gs = fresh()
    floor_ms = timeit(lambda: torch._foreach_add_(ws, gs), a.reps, dev)

    speedup, floor_ratio = loop_ms / ours_ms, ours_ms / floor_ms
    print(f"ResNet-50 parameter set: {len(shapes)} tensors, {n / 1e6:.2f} M weights, device {dev}, "
          f"{torch.get_num_threads()} threads, median of {a.reps}")
    print(f"  (a) per-tensor loop (float64 masks, .item()) {loop_ms:9.2f} ms/step")
    print(f"  (b) ours ({used:8s})                       {ours_ms:9.2f} ms/step")
    print(f"  (c) floor: one _foreach_add_               {floor_ms:9.2f} ms/step")
    print(f"  a/b = {speedup:.1f}  (goal >= 5)    b/c = {floor_ratio:.2f}  (goal <= 3)")
    print(f"  optimizer state: {state_bytes / 2**20:.1f} MiB = {state_bytes / (4 * n):.4f} x the weights "
          f"(one float32 moving average per weight + {len(shapes)} int64 counters)")
    print(json.dumps({"loop_ms": round(loop_ms, 3), "ours_ms": round(ours_ms, 3), "floor_ms": round(floor_ms, 3),
                      "speedup": round(speedup, 3), "floor_ratio": round(floor_ratio, 3), "implementation": used,
                      "state_bytes": state_bytes}))


if __name__ == "__main__":
    main()
