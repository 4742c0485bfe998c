"""SynFlow, 100 iterations, density 0.3, on cifar_resnet18 with a CIFAR-shaped input, on the CPU.

In one process: (a) a straightforward implementation written here the way the original PaB code
prunes (the whole model in float64; every iteration: take abs of every state-dict tensor, score,
restore the signs, a global `kthvalue` over all scores, masks by `score <= threshold`), and
(b) ours, `pab_framework.masking.prune` with the `synflow` plugin. Prints both times, the ratio,
whether the masks agree, then ResNet-50 at 224x224 with ours and GraSP's peak memory on ResNet-50
(1 and 3 batches of --grasp-batch images, each measured in a child process as the rise of its
peak RSS: equal figures show that only one batch's graph is alive at a time).
The last line is one JSON object.

    python benchmarks/prune_speed.py [--iterations 100] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pab_framework import masking  # noqa: E402
from pab_framework.modelutil import prunable_parameters  # noqa: E402
from plugins.models.resnet_cifar import cifar_resnet18  # noqa: E402
from plugins.pruners.basic import SynFlow  # noqa: E402
from plugins.pruners.saliency import GraSP  # noqa: E402


def baseline_synflow(model: nn.Module, input_shape, density: float, iterations: int) -> dict[str, torch.Tensor]:
    """The original code's loop, in its style."""
    model = copy.deepcopy(model).double().eval()
    params = prunable_parameters(model)
    masks = {n: torch.ones_like(p) for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    for k in range(iterations):
        with torch.no_grad():
            for n, p in params.items():
                p.mul_(masks[n])
        signs = {}
        with torch.no_grad():
            for name, t in model.state_dict().items():
                signs[name] = torch.sign(t)
                t.abs_()
        model.zero_grad()
        out = model(torch.ones((1, *input_shape), dtype=torch.float64))
        out.sum().backward()
        scores = {n: (p.grad * p).detach().abs() for n, p in params.items()}
        with torch.no_grad():
            for name, t in model.state_dict().items():
                t.mul_(signs[name])
        d = density ** ((k + 1) / iterations)
        flat = torch.cat([s.flatten() for s in scores.values()])
        kk = int((1.0 - d) * flat.numel())
        if kk >= 1:
            thr, _ = torch.kthvalue(flat, kk)
            for n in params:
                masks[n] = torch.where(scores[n] <= thr, torch.zeros_like(masks[n]), torch.ones_like(masks[n]))
    return {n: m.bool() for n, m in masks.items()}


def ours(model: nn.Module, input_shape, density: float, iterations: int, pruner=None, pparams=None, batches=()) -> dict:
    call = masking.MaskPolicy(density=density, iterations=iterations, schedule="exponential", scope="global")
    inputs = masking.PruneInputs(input_shape=tuple(input_shape), num_classes=10, batches=list(batches))
    pruner = pruner or SynFlow()
    return masking.prune(model, pruner, pparams or pruner.Params(), call, inputs)


def grasp_peak_child(batch: int, n_batches: int) -> None:
    """In a child process: the peak RSS rise of one GraSP scoring of ResNet-50 on n_batches batches."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    data = [(torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))) for _ in range(n_batches)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call = masking.MaskPolicy(density=0.5, iterations=1, schedule="exponential", scope="global")
    inputs = masking.PruneInputs(input_shape=(3, 224, 224), num_classes=1000, batches=data, dtype=torch.float32)
    t = time.perf_counter()
    masking.prune(model, GraSP(), GraSP.Params(), call, inputs)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rise_mib": (after - before) / 1024, "wall_s": wall}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="20 iterations, ResNet-50 with 5, GraSP batch 2")
    ap.add_argument("--grasp-batch", type=int, default=8)
    ap.add_argument("--grasp-child", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.grasp_child:
        return grasp_peak_child(*a.grasp_child)
    iters = 20 if a.quick else a.iterations
    torch.manual_seed(0)
    model = cifar_resnet18()
    shape = (3, 32, 32)

    t = time.perf_counter()
    base_masks = baseline_synflow(model, shape, 0.3, iters)
    baseline_s = time.perf_counter() - t
    t = time.perf_counter()
    our_masks = ours(model, shape, 0.3, iters)
    ours_s = time.perf_counter() - t
    equal = all(torch.equal(base_masks[n], our_masks[n]) for n in base_masks)
    differ = sum(int((base_masks[n] != our_masks[n]).sum()) for n in base_masks)
    kept = sum(int(m.sum()) for m in our_masks.values())
    total = sum(m.numel() for m in our_masks.values())

    import torchvision

    r50 = torchvision.models.resnet50()
    r50_iters = 5 if a.quick else iters
    t = time.perf_counter()
    ours(r50, (3, 224, 224), 0.5, r50_iters)
    resnet50_s = time.perf_counter() - t

    gb = 2 if a.quick else a.grasp_batch
    def grasp_child(n):
        out = subprocess.run([sys.executable, __file__, "--grasp-child", str(gb), str(n)], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    grasp, grasp3 = grasp_child(1), grasp_child(3)

    print(f"SynFlow on cifar_resnet18, {iters} iterations, density 0.3, CPU ({torch.get_num_threads()} threads)")
    print(f"  original-style loop  {baseline_s:8.2f} s")
    print(f"  ours                 {ours_s:8.2f} s   speedup {baseline_s / ours_s:.2f}x  (goal >= 2)")
    print(f"  masks equal: {equal} ({differ} entries differ; ours keeps {kept}/{total} = {kept / total:.6f})")
    print(f"  ResNet-50 224x224, {r50_iters} iterations, density 0.5: {resnet50_s:.2f} s")
    print(f"  GraSP on ResNet-50 (float32), batches of {gb}: peak memory rise {grasp['peak_rise_mib']:.0f} MiB with 1 batch, "
          f"{grasp3['peak_rise_mib']:.0f} MiB with 3 (one batch's graph alive at a time), {grasp['wall_s']:.1f} s / {grasp3['wall_s']:.1f} s")
    print(json.dumps({"baseline_s": round(baseline_s, 3), "ours_s": round(ours_s, 3), "speedup": round(baseline_s / ours_s, 3),
                      "masks_equal": equal, "resnet50_s": round(resnet50_s, 3), "grasp_peak_mib": round(grasp["peak_rise_mib"], 1),
                      "grasp_peak_mib_3_batches": round(grasp3["peak_rise_mib"], 1)}))


if __name__ == "__main__":
    main()
