"""`pab export`'s formats side by side: file sizes, export and load times, and ONNX Runtime against torch eager.

For cifar_resnet18 (CIFAR shape) and ResNet-50 (224x224, 1000 classes), at densities 0.05, 0.3 and
0.5: a stage directory as a PaB train stage leaves it (kaiming-normal initialisation, magnitude
masks at that density, then the signs of 10 % of the survivors flipped, as Bop does), exported to
every format. Sizes against model.pt; the information bound, (1 + density) bits per prunable weight
plus the other tensors; export and load times (load = `pab_framework.load`, checked bitwise against
model.pt's logits); then, once per model, the latency of one batch in torch eager and in ONNX
Runtime on the CPU. Unstructured sparsity makes no dense kernel faster: the ONNX graph is the dense
architecture with zeros in it, so its latency says what the runtime does, not what sparsity saves.

    python benchmarks/export.py [--quick] [--models cifar_resnet18,resnet50] [--densities 0.05,0.3,0.5]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import pab_framework  # noqa: E402
from pab_framework import artifacts, export  # noqa: E402
from pab_framework.masking import keep_top, kept_count  # noqa: E402
from pab_framework.specification import spec_from_dict  # noqa: E402
from pab_framework.yamlio import dump_yaml  # noqa: E402

SHAPES = {"cifar_resnet18": ([3, 32, 32], 10, 32), "resnet50": ([3, 224, 224], 1000, 8)}  # input, classes, latency batch


def make_stage(root: Path, model: str, density: float) -> Path:
    """A train stage directory as PaB leaves it: init weights, masks at `density`, 10 % of the survivors' signs flipped."""
    shape, classes, _ = SHAPES[model]
    spec = spec_from_dict({"name": "bench", "seed": 0, "model": {"name": model, "init": "kaiming_normal"},
                           "data": {"name": "synthetic", "input_shape": shape, "num_classes": classes},
                           "stages": {"train": {"kind": "train", "epochs": 1}}, "runtime": {"device": "cpu"}})
    src_model = export.build_from_recipe({"version": export.RECIPE_VERSION, "model": spec.resolved_dict()["model"], "seed": 0,
                                          "data_info": {"num_classes": classes, "input_shape": shape}})
    params = dict(src_model.named_parameters())
    names = [n for n, p in params.items() if p.dim() > 1]  # conv and linear weights
    flat = torch.cat([params[n].detach().abs().reshape(-1) for n in names])
    keep = keep_top(flat, kept_count(density, flat.numel()))
    g = torch.Generator().manual_seed(1)
    masks, o = {}, 0
    with torch.no_grad():
        for n in names:
            p = params[n]
            m = keep[o : o + p.numel()].view(p.shape)
            o += p.numel()
            flip = (torch.rand(p.shape, generator=g) < 0.1) & m
            p.mul_(m).mul_(torch.where(flip, -1.0, 1.0))
            masks[n] = m.clone()
    d = root / f"{model}-{density}" / "train-0"
    d.mkdir(parents=True)
    artifacts.save_model(d / artifacts.MODEL, src_model, masks)
    artifacts.atomic_write_text(d / artifacts.SPEC, dump_yaml({"stage": "train", "key": "0", "spec": spec.resolved_dict()}))
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    artifacts.atomic_write_json(d / artifacts.RESULT, {"density": kept / total, "data_info": {"num_classes": classes, "input_shape": shape}})
    return d


def bound_bytes(d: Path) -> int:
    state, masks = artifacts.load_model_artifact(d / artifacts.MODEL)
    n = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return math.ceil((n + kept) / 8) + sum(t.numel() * t.element_size() for k, t in state.items() if k not in masks)


def timed(fn, repeat: int = 1):
    best = float("inf")
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def sizes(d: Path, formats: list[str]) -> dict:
    shape = SHAPES[d.parent.name.split("-")[0]][0]
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = pab_framework.load(d / artifacts.MODEL)(x)
    row = {"model_pt": (d / artifacts.MODEL).stat().st_size, "bound": bound_bytes(d)}
    for fmt in formats:
        e, t_exp = timed(lambda: export.export_stage(d, fmt))
        row[fmt] = e.bytes
        row[f"{fmt}_export_s"] = round(t_exp, 3)
        if fmt != "onnx":
            m, t_load = timed(lambda: pab_framework.load(e.path))
            with torch.no_grad():
                row[f"{fmt}_bitwise"] = bool(torch.equal(m(x), ref))
            row[f"{fmt}_load_s"] = round(t_load, 3)
    return row


def latency(d: Path, batch: int, repeat: int) -> dict:
    import onnxruntime as ort

    shape = SHAPES[d.parent.name.split("-")[0]][0]
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(3))
    model = pab_framework.load(d / artifacts.MODEL)
    sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {"input": x.numpy()}
    with torch.no_grad():
        model(x)
        _, t_torch = timed(lambda: model(x), repeat)
    sess.run(None, feed)
    _, t_ort = timed(lambda: sess.run(None, feed), repeat)
    return {"batch": batch, "torch_ms": round(t_torch * 1e3, 2), "ort_ms": round(t_ort * 1e3, 2), "ort_over_torch": round(t_ort / t_torch, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="cifar_resnet18,resnet50")
    ap.add_argument("--densities", default="0.05,0.3,0.5")
    ap.add_argument("--quick", action="store_true", help="cifar_resnet18 at 0.3 only, latency over 3 runs")
    ap.add_argument("--repeat", type=int, default=10, help="latency: best of this many batches")
    a = ap.parse_args()
    models = ["cifar_resnet18"] if a.quick else a.models.split(",")
    densities = [0.3] if a.quick else [float(x) for x in a.densities.split(",")]
    repeat = 3 if a.quick else a.repeat
    have_onnx = all(__import__("importlib").util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript"))
    figures: dict = {"threads": torch.get_num_threads(), "rows": [], "latency": {}}
    print(f"pab export on the CPU ({torch.get_num_threads()} threads); sizes in KB, ratio to model.pt")
    print(f"{'model':16} {'density':>7} {'model.pt':>10} {'bound':>9} {'packed':>9} {'ratio':>7} {'safetensors':>11} {'onnx':>9}"
          f" {'export s (packed)':>17} {'load s (packed)':>15} bitwise")
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            for i, dens in enumerate(densities):
                d = make_stage(Path(tmp), model, dens)
                formats = ["packed", "safetensors"] + (["onnx"] if have_onnx and i == 0 else [])
                row = {"model": model, "density": dens, **sizes(d, formats)}
                figures["rows"].append(row)
                kb = lambda k: f"{row[k] / 1024:9.1f}" if k in row else f"{'-':>9}"  # noqa: E731
                print(f"{model:16} {dens:7.2f} {row['model_pt'] / 1024:10.1f} {kb('bound')} {kb('packed')} {row['packed'] / row['model_pt']:7.4f}"
                      f" {row['safetensors'] / 1024:11.1f} {kb('onnx')} {row['packed_export_s']:17.2f} {row['packed_load_s']:15.2f} "
                      f"{row['packed_bitwise'] and row['safetensors_bitwise']}")
                if "onnx" in formats:
                    figures["latency"][model] = latency(d, SHAPES[model][2], repeat)
    for model, lat in figures["latency"].items():
        print(f"latency {model}, batch {lat['batch']}: torch eager {lat['torch_ms']} ms, ONNX Runtime {lat['ort_ms']} ms "
              f"({lat['ort_over_torch']}x); both run the dense architecture: zeros cost as much as weights")
    if not have_onnx:
        print("onnx: not measured (pip install 'pab[export]')")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
