"""SynFlow, 100 iterations, on cifar_resnet18 (density 0.3) and ResNet-50 (density 0.5), against the original code's loop.

In one process, on --device: (a) a straightforward implementation written here the way the original
PaB code prunes (the whole model in float64; every iteration: take abs of every state-dict tensor,
score, restore the signs, a global `kthvalue` over all scores, masks by `score <= threshold`), over
the pool the original prunes: on the CIFAR ResNet-18 the convolutions only (its classifier is a
plain nn.Linear, neither pruned nor scored), on the ImageNet ResNet-50 conv1, the bottleneck
convolutions and fc (its shortcut convolutions are plain nn.Conv2d, outside the pool); and
(b) ours, `pab_framework.masking.prune` with the `synflow` plugin and the recipes' settings
(configs/cifar10_r18_pab.yaml: `classifier_density: 1.0`; configs/imagenet_r50.yaml: fc pruned,
`exclude: ["*.downsample.*"]`).
Prints both times, the ratio, and whether the masks agree (`masks_equal`), for cifar_resnet18,
then ResNet-50 at 224x224 (ours only, or against the original-style loop with --resnet50-baseline),
then GraSP's peak memory on ResNet-50 (CPU only: 1 and 3 batches of --grasp-batch images, each
measured in a child process as the rise of its peak RSS: equal figures show that only one batch's
graph is alive at a time; --no-grasp leaves it out). The last line is one JSON object.

    python benchmarks/prune_speed.py [--iterations 100] [--quick] [--device cuda] [--resnet50-baseline] [--no-grasp]
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
from pab_framework.modelutil import classifier_name, initialise, prunable_parameters  # noqa: E402
from pab_plugins.models.resnet_cifar import cifar_resnet18  # noqa: E402
from pab_plugins.pruners.basic import SynFlow  # noqa: E402
from pab_plugins.pruners.saliency import GraSP  # noqa: E402


# The convolutions the original's ImageNet ResNet-50 builds unmasked: its shortcut (downsample) convolutions.
R50_EXCLUDE = ("*.downsample.*",)


def original_pool(model: nn.Module, num_classes: int, classifier: bool, exclude: tuple[str, ...] = ()) -> list[str]:
    """The weights the original code masks: every Conv2d but those it builds unmasked (`exclude`:
    its ImageNet ResNet-50's shortcut convolutions), and the classifier only where the original
    builds it as a masked layer (its ImageNet ResNet-50, not its CIFAR ResNet-18)."""
    cls = classifier_name(model, num_classes)
    out = set(n for hit in masking.excluded_names(list(prunable_parameters(model)), exclude).values() for n in hit)
    return [n for n in prunable_parameters(model) if (classifier or n != cls) and n not in out]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def baseline_synflow(model: nn.Module, input_shape, density: float, iterations: int, pool: list[str],
                     device: torch.device = torch.device("cpu")) -> dict[str, torch.Tensor]:
    """The original code's loop, in its style, over `pool` (the other weights are neither pruned nor scored)."""
    model = copy.deepcopy(model).to(device).double().eval()
    named = dict(model.named_parameters())
    params = {n: named[n] for n in pool}
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
        out = model(torch.ones((1, *input_shape), dtype=torch.float64, device=device))
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
    out = {n: m.bool().cpu() for n, m in masks.items()}
    return out


def ours(model: nn.Module, input_shape, density: float, iterations: int, pruner=None, pparams=None, batches=(),
         classifier_density=None, num_classes: int = 10, device: torch.device = torch.device("cpu"), exclude=()) -> dict:
    call = masking.MaskPolicy(density=density, iterations=iterations, schedule="exponential", scope="global",
                              classifier_density=classifier_density, exclude=tuple(exclude))
    inputs = masking.PruneInputs(input_shape=tuple(input_shape), num_classes=num_classes, batches=list(batches), device=device)
    pruner = pruner or SynFlow()
    return masking.prune(model, pruner, pparams or pruner.Params(), call, inputs)


def compare(model: nn.Module, shape, density: float, iters: int, num_classes: int, prune_classifier: bool,
            device: torch.device, exclude: tuple[str, ...] = ()) -> dict:
    """Both loops on `model`, the original's pool and the recipe's settings; times, ratio, mask agreement."""
    pool = original_pool(model, num_classes, prune_classifier, exclude)
    _sync(device)
    t = time.perf_counter()
    base = baseline_synflow(model, shape, density, iters, pool, device)
    _sync(device)
    baseline_s = time.perf_counter() - t
    t = time.perf_counter()
    got = ours(model, shape, density, iters, classifier_density=None if prune_classifier else 1.0, num_classes=num_classes, device=device,
               exclude=exclude)
    ours_s = time.perf_counter() - t
    # outside the original's pool a weight is never pruned: compare over every prunable weight
    base = {n: base.get(n, torch.ones_like(got[n])) for n in got}
    differ = sum(int((base[n] != got[n]).sum()) for n in got)
    kept = sum(int(m.sum()) for m in got.values())
    total = sum(m.numel() for m in got.values())
    return {"baseline_s": baseline_s, "ours_s": ours_s, "equal": differ == 0, "differ": differ, "kept": kept, "total": total}


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
    ap.add_argument("--device", default="cpu", help="where both loops run (cpu, cuda, cuda:1, ...)")
    ap.add_argument("--resnet50-baseline", action="store_true", help="also time the original-style loop on ResNet-50 and compare its masks")
    ap.add_argument("--no-grasp", action="store_true", help="leave out GraSP's peak-memory measurement (host memory, CPU only)")
    ap.add_argument("--grasp-batch", type=int, default=8)
    ap.add_argument("--grasp-child", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.grasp_child:
        return grasp_peak_child(*a.grasp_child)
    device = torch.device(a.device)
    iters = 20 if a.quick else a.iterations
    torch.manual_seed(0)
    model = cifar_resnet18()
    initialise(model, "kaiming_normal", "conv")  # as the recipes (and the original's --init-method kaiming_normal)
    cifar = compare(model, (3, 32, 32), 0.3, iters, 10, False, device)

    import torchvision

    torch.manual_seed(0)
    r50 = torchvision.models.resnet50()
    initialise(r50, "kaiming_normal", "conv")
    r50_iters = 5 if a.quick else iters
    if a.resnet50_baseline:
        r50_cmp = compare(r50, (3, 224, 224), 0.5, r50_iters, 1000, True, device, R50_EXCLUDE)
        resnet50_s = r50_cmp["ours_s"]
    else:
        t = time.perf_counter()
        ours(r50, (3, 224, 224), 0.5, r50_iters, num_classes=1000, device=device, exclude=R50_EXCLUDE)
        resnet50_s = time.perf_counter() - t

    where = f"{device.type.upper()}" + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else f" ({torch.cuda.get_device_name(device)})")
    print(f"SynFlow on cifar_resnet18, {iters} iterations, density 0.3, {where}; the original's pool (convolutions; classifier dense)")
    print(f"  original-style loop  {cifar['baseline_s']:8.2f} s")
    print(f"  ours                 {cifar['ours_s']:8.2f} s   speedup {cifar['baseline_s'] / cifar['ours_s']:.2f}x  (goal >= 2)")
    print(f"  masks equal: {cifar['equal']} ({cifar['differ']} entries differ; ours keeps {cifar['kept']}/{cifar['total']} = "
          f"{cifar['kept'] / cifar['total']:.6f})")
    figs = {"device": str(device), "iterations": iters, "baseline_s": round(cifar["baseline_s"], 3), "ours_s": round(cifar["ours_s"], 3),
            "speedup": round(cifar["baseline_s"] / cifar["ours_s"], 3), "masks_equal": cifar["equal"], "masks_differ": cifar["differ"],
            "resnet50_iterations": r50_iters, "resnet50_s": round(resnet50_s, 3)}
    if a.resnet50_baseline:
        print(f"ResNet-50 224x224, {r50_iters} iterations, density 0.5; the original's pool (conv1, bottleneck convolutions and fc; shortcuts dense)")
        print(f"  original-style loop  {r50_cmp['baseline_s']:8.2f} s")
        print(f"  ours                 {r50_cmp['ours_s']:8.2f} s   speedup {r50_cmp['baseline_s'] / r50_cmp['ours_s']:.2f}x")
        print(f"  masks equal: {r50_cmp['equal']} ({r50_cmp['differ']} entries differ)")
        figs.update({"resnet50_baseline_s": round(r50_cmp["baseline_s"], 3), "resnet50_speedup": round(r50_cmp["baseline_s"] / r50_cmp["ours_s"], 3),
                     "resnet50_masks_equal": r50_cmp["equal"], "resnet50_masks_differ": r50_cmp["differ"]})
    else:
        print(f"  ResNet-50 224x224, {r50_iters} iterations, density 0.5: {resnet50_s:.2f} s")

    if not a.no_grasp:
        gb = 2 if a.quick else a.grasp_batch

        def grasp_child(n):
            out = subprocess.run([sys.executable, __file__, "--grasp-child", str(gb), str(n)], capture_output=True, text=True, check=True)
            return json.loads(out.stdout.strip().splitlines()[-1])

        grasp, grasp3 = grasp_child(1), grasp_child(3)
        print(f"  GraSP on ResNet-50 (float32, CPU), batches of {gb}: peak memory rise {grasp['peak_rise_mib']:.0f} MiB with 1 batch, "
              f"{grasp3['peak_rise_mib']:.0f} MiB with 3 (one batch's graph alive at a time), {grasp['wall_s']:.1f} s / {grasp3['wall_s']:.1f} s")
        figs.update({"grasp_peak_mib": round(grasp["peak_rise_mib"], 1), "grasp_peak_mib_3_batches": round(grasp3["peak_rise_mib"], 1)})
    print(json.dumps(figs))


if __name__ == "__main__":
    main()
