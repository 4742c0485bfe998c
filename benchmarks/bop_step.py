"""Milliseconds per Bop step on ResNet-50's parameter set (161 tensors, about 25.6 M weights).

In one process, on the same tensors and random gradients:
  (a) loop   - a straightforward per-tensor Python loop, the way the original PaB code steps:
               float64 flip masks and a `.item()` per tensor every step;
  (b) ours   - pab_plugins.optimizers.bop_optim.Bop with --implementation (auto: compiled for a model
               this size where Inductor works), gradients in its flat buffer as in training
               (`zero_grad(set_to_none=False)`, autograd accumulating into the views);
      ours, new gradient tensors every step (`set_to_none=True`): the step copies them in first;
      eager  - the same optimizer with implementation="eager", for comparison;
  (c) floor  - one `torch._foreach_add_` over the same tensors: the memory-bandwidth floor (reads
               two tensors, writes one; a Bop step reads three and writes two, so 5/3 of it is the
               least any step can take).
Prints a table, then the ratios a/b (goal >= 5) and b/c (goal <= 3), and as its last line one JSON
object. Best of --reps repetitions, taken round-robin after a warm-up (the compiled step compiles in
the first step: `first_step_s`); the medians of (b) and (c) are printed too. On CUDA every timed
repetition is synchronised before and after, and is a burst of --burst steps (default 20 on CUDA,
1 on the CPU) divided by their number: the device's time per step when steps follow one another
as in training, where the host queues the next launches while the device works. The latency of a
single synchronised step (host launch time included) is printed beside it (`*_latency_ms`).

    python benchmarks/bop_step.py [--reps 7] [--implementation auto|eager|compiled] [--device cpu|cuda] [--burst N]
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
from pab_plugins.optimizers.bop_optim import Bop  # noqa: E402


def loop_step(ws, gs, ms, ar, tau, counts):
    """The original's style: one tensor at a time, float64 masks, a host read per tensor."""
    for i, (w, g) in enumerate(zip(ws, gs)):
        m = ms[i]
        m.mul_(1 - ar).add_(g * ar)
        mask = ((m.abs() >= tau) & (torch.sign(m) == torch.sign(w))).double()
        w.mul_((1 - 2 * mask).to(w.dtype))
        counts[i] += int(mask.sum().item())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fns: dict, reps: int, device: str, burst: int = 1) -> tuple[dict, dict]:
    """Best and median milliseconds per call of each `name: (fn, setup)`, measured round-robin (one
    repetition of each in turn), so that a busy machine slows them alike; a repetition is `burst`
    calls (each after its setup) between two synchronisations. Interference only ever adds time:
    the ratios use the best."""
    for fn, setup in fns.values():  # warm-up (allocations, compilation)
        if setup:
            setup()
        fn()
    ts = {k: [] for k in fns}
    for _ in range(reps):
        for k, (fn, setup) in fns.items():
            if setup:
                setup()
            sync(device)
            t = time.perf_counter()
            fn()
            for _ in range(burst - 1):
                if setup:
                    setup()
                fn()
            sync(device)
            ts[k].append((time.perf_counter() - t) * 1000 / burst)
    return {k: min(v) for k, v in ts.items()}, {k: statistics.median(v) for k, v in ts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--implementation", default="auto", choices=["auto", "eager", "compiled"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--burst", type=int, default=None, help="steps per timed repetition (default 20 on CUDA, 1 on the CPU)")
    a = ap.parse_args()
    burst = a.burst or (20 if a.device.startswith("cuda") else 1)
    torch.manual_seed(0)
    shapes = [p.shape for p in torchvision.models.resnet50().parameters()]
    dev = a.device
    n = sum(torch.Size(s).numel() for s in shapes)

    def fresh():
        ws = [torch.randn(s, device=dev) for s in shapes]
        gs = [torch.randn(s, device=dev) * 1e-3 for s in shapes]
        return ws, gs

    lw, lg = fresh()
    lm = [torch.zeros_like(w) for w in lw]
    counts = [0] * len(lw)

    def make(impl: str):
        ws, gs = fresh()
        params = [torch.nn.Parameter(w) for w in ws]
        for p, g in zip(params, gs):
            p.grad = g
        return params, gs, Bop(params, ar=1e-3, tau=1e-6, implementation=impl)

    params, gs, opt = make(a.implementation)
    sync(dev)
    t0 = time.perf_counter()
    opt.step()  # builds the flat layout (gradients copied into it) and compiles if compiled
    sync(dev)
    first_step_s = time.perf_counter() - t0
    used = opt.last_implementation
    state_bytes, scratch_bytes = opt.extra_memory_bytes(), opt.scratch_bytes()
    # a second optimizer whose step gets new gradient tensors every time (set_to_none=True)
    params2, gs2, opt2 = make(a.implementation)

    def new_grads():
        for p, g in zip(params2, gs2):
            p.grad = g

    fw, fg = fresh()
    fns = {
        "loop": (lambda: loop_step(lw, lg, lm, 1e-3, 1e-6, counts), None),
        "ours": (opt.step, None),
        "fresh": (opt2.step, new_grads),
        "floor": (lambda: torch._foreach_add_(fw, fg), None),
    }
    if used != "eager":
        _, _, eager = make("eager")
        fns["eager"] = (eager.step, None)
    t, med = timeit(fns, a.reps, dev, burst)
    lat = timeit({k: fns[k] for k in ("ours", "floor")}, a.reps, dev)[0] if burst > 1 else {k: t[k] for k in ("ours", "floor")}
    loop_ms, ours_ms, fresh_ms, floor_ms = t["loop"], t["ours"], t["fresh"], t["floor"]
    eager_ms = t.get("eager", ours_ms)

    speedup, floor_ratio = loop_ms / ours_ms, ours_ms / floor_ms
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    print(f"ResNet-50 parameter set: {len(shapes)} tensors, {n / 1e6:.2f} M weights, {name}, torch {torch.__version__}, "
          f"best of {a.reps} (median of ours / floor: {med['ours']:.3f} / {med['floor']:.3f} ms)")
    print(f"  (a) per-tensor loop (float64 masks, .item())  {loop_ms:9.3f} ms/step")
    print(f"  (b) ours ({used:8s}), gradients in place      {ours_ms:9.3f} ms/step   {floor_ratio:6.2f} x floor")
    print(f"      ours ({used:8s}), new gradient tensors    {fresh_ms:9.3f} ms/step   {fresh_ms / floor_ms:6.2f} x floor")
    print(f"      eager                                     {eager_ms:9.3f} ms/step   {eager_ms / floor_ms:6.2f} x floor")
    print(f"  (c) floor: one _foreach_add_                  {floor_ms:9.3f} ms/step")
    print(f"  a/b = {speedup:.1f}  (goal >= 5)    b/c = {floor_ratio:.2f}  (goal <= 3)" + (f"    steps in bursts of {burst}; "
          f"one synchronised step alone: ours {lat['ours']:.3f} ms, floor {lat['floor']:.3f} ms" if burst > 1 else ""))
    print(f"  first step (layout{', compilation' if used == 'compiled' else ''}): {first_step_s:.1f} s")
    print(f"  optimizer state: {state_bytes / 2**20:.1f} MiB = {state_bytes / (4 * n):.4f} x the weights "
          f"(one float32 moving average per weight + {len(shapes)} int64 counters); scratch {scratch_bytes / 2**20:.1f} MiB")
    print(json.dumps({"loop_ms": round(loop_ms, 3), "ours_ms": round(ours_ms, 3), "floor_ms": round(floor_ms, 3),
                      "speedup": round(speedup, 3), "floor_ratio": round(floor_ratio, 3), "implementation": used,
                      "fresh_grads_ms": round(fresh_ms, 3), "fresh_grads_floor_ratio": round(fresh_ms / floor_ms, 3),
                      "eager_ms": round(eager_ms, 3), "eager_floor_ratio": round(eager_ms / floor_ms, 3),
                      "first_step_s": round(first_step_s, 2), "state_bytes": state_bytes, "scratch_bytes": scratch_bytes,
                      "ours_ms_median": round(med["ours"], 3), "floor_ms_median": round(med["floor"], 3), "burst": burst,
                      "ours_latency_ms": round(lat["ours"], 3), "floor_latency_ms": round(lat["floor"], 3),
                      "device": name, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
