"""Images per second of the train stage against a bare PyTorch loop (cifar_resnet18, or any model).

In one process, alternating, on the same data, the same model (Kaiming-normal) and the same
optimizer (the `bop` plugin: Bop for the weights, SGD for the rest):
  (a) bare - a hand-written loop: batches, forward, loss, backward, step, and a validation pass
             per epoch, nothing else;
  (b) pab  - `pab_framework.pipeline.run_spec` on a spec with one train stage: its wall time,
             with everything the stage does besides (checkpoint every epoch, metrics.jsonl,
             non-finite checks, running sums, progress).
Data (--data): `imagefolder` (default), a generated 32x32 image folder read with the plugin's
training augmentation through a DataLoader (the bare loop uses a DataLoader too); or `synthetic`,
the `synthetic` plugin's in-memory tensors (no disk, no decoding: the framework's own cost), which
both loops keep on the device and batch by indexing.
images/s = training images x epochs / wall time. overhead = bare/pab - 1 (goal <= 0.05). Best of
--reps alternating repetitions (this machine is shared: the best run is the least disturbed).
Beside it, the run split in two: seconds per epoch (training and validation: pab's `epoch_s` of
metrics.jsonl, the bare loop's own) and the fixed seconds around the epochs (building the model
and the optimizer, moving the data, and for pab checkpoints, model.pt and result.json), so a
long run's overhead (epoch_overhead) reads apart from a short run's set-up.
With --nproc N (N > 1) it also runs `pab run --nproc N` and reports the scaling over one process.
With --compile MODE both are compiled the same way: pab through `runtime.compile: MODE`, the bare
loop's model with the same in-place compile (`pab_framework.compiling.compile_forward`); each run
compiles its own model in its first epoch, which the per-epoch figures leave out (with --epochs 2
or more), and the first step's seconds of each (bare_compile_s, pab_compile_s: the stage's
result.json `compile_s`) are given beside.

    python benchmarks/train_throughput.py [--quick] [--reps 3] [--nproc 2] [--device cpu] [--phases] [--compile default]
    python benchmarks/train_throughput.py --device cuda --data synthetic --model resnet50 --batch 64 --image-size 224 --classes 1000
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pab_framework.compiling import compile_forward  # noqa: E402
from pab_framework.context import StageContext  # noqa: E402
from pab_framework.modelutil import prunable_parameters  # noqa: E402
from pab_framework.optim import OptimizerContext  # noqa: E402
from pab_framework.pipeline import run_spec  # noqa: E402
from pab_framework.specification import load_spec  # noqa: E402
from pab_framework.yamlio import dump_yaml  # noqa: E402


def make_images(root: Path, n_train: int, n_val: int, classes: int = 10) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            d = root / split / f"c{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()).save(d / f"{i}.png")


def spec_dict(data: dict, out: Path, model: dict, batch: int, epochs: int, device: str, compile_mode: str = "none") -> dict:
    return {
        "name": "throughput",
        "seed": 0,
        "model": {**model, "init": "kaiming_normal"},
        "data": {**data, "batch_size": batch},
        "stages": {"train": {"kind": "train", "epochs": epochs,
                             "optimizer": {"name": "bop", "ar": 1e-3, "tau": 1e-6,
                                           "rest": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}}}},
        "runtime": {"device": device, "output_dir": str(out), "progress": "none", "compile": compile_mode},
    }


def bare(spec, epochs: int, acc: dict | None = None, epoch_s: list | None = None) -> tuple[float, int]:
    """The same model, optimizer and data in a loop with nothing else; (seconds, training images).
    `epoch_s` gets each epoch's seconds (training and validation); with runtime.compile the model
    is compiled as the train stage compiles it, and `acc["compile_s"]` gets the first step's seconds."""
    t0 = time.perf_counter()
    device = torch.device(spec.runtime.device)
    st = spec.stages["train"]
    ctx = StageContext(spec, "train", st, "", Path("."), {}, device, None)  # only its builders are used
    model = ctx.build_model().to(device)
    opts = spec.runtime.compile_options()
    if opts is not None:
        compile_forward(model, opts, device)
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in prunable_parameters(model).items()}
    named = list(model.named_parameters())
    module_of = {f"{mn}.{pn}" if mn else pn: m for mn, m in model.named_modules() for pn, _ in m.named_parameters(recurse=False)}
    train_ds, val_ds = ctx.dataset("train"), ctx.dataset("val")
    g = torch.Generator().manual_seed(0)
    bs = spec.data.batch_size
    if isinstance(train_ds, torch.utils.data.TensorDataset):  # in memory: on the device, batched by indexing
        tx, ty = (t.to(device) for t in train_ds.tensors)
        vx, vy = (t.to(device) for t in val_ds.tensors)

        class _Epoch:
            def __len__(self):
                return -(-len(ty) // bs)

            def __iter__(self):
                idx = torch.randperm(len(ty), generator=g).to(device)
                for i in range(0, len(ty), bs):
                    j = idx[i : i + bs]
                    yield tx[j], ty[j]

        train = _Epoch()
        val = [(vx[i : i + bs], vy[i : i + bs]) for i in range(0, len(vy), bs)]
    else:
        train = torch.utils.data.DataLoader(train_ds, batch_size=bs, shuffle=True, generator=g)
        val = torch.utils.data.DataLoader(val_ds, batch_size=bs)
    call = st.params.optimizer
    opt = call.plugin.build(call.params, OptimizerContext(named, masks, epochs, len(train), module_of))
    loss_fn = nn.CrossEntropyLoss()
    n = 0
    acc = {} if acc is None else acc
    for epoch in range(epochs):
        model.train()
        t_steps = time.perf_counter()
        for x, y in train:
            t_first = time.perf_counter() if n == 0 else None
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            n += y.numel()
            if t_first is not None and opts is not None:
                acc["compile_s"] = time.perf_counter() - t_first
        opt.schedule_epoch(epoch)
        t_eval = time.perf_counter()
        acc["steps"] = acc.get("steps", 0.0) + t_eval - t_steps
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(x.to(device)).argmax(1) == y.to(device)).sum()) for x, y in val)  # waits for the device
        assert 0 <= correct <= len(val_ds)
        acc["evaluate"] = acc.get("evaluate", 0.0) + time.perf_counter() - t_eval
        if epoch_s is not None:
            epoch_s.append(time.perf_counter() - t_steps)
    return time.perf_counter() - t0, n


def pab(spec, epoch_s: list | None = None, acc: dict | None = None) -> tuple[float, int]:
    (out,) = run_spec(spec, force=True)
    if acc is not None and "compile_s" in out.result:
        acc["compile_s"] = out.result["compile_s"]
    if epoch_s is not None:
        epoch_s += [json.loads(line)["epoch_s"] for line in (out.dir / "metrics.jsonl").read_text().splitlines()]
    return out.wall_s, len(spec.data.plugin.build(spec.data.params, "train", base_dir=spec.base_dir)) * spec.stages["train"].params.epochs


# --phases: where the stage's wall time goes (seconds per run, summed over calls)
PHASES = (("load_model", "pab_framework.context", "StageContext.load_model"),
          ("trainer_setup", "pab_framework.trainer", "Trainer.__init__"),
          ("steps", "pab_framework.trainer", "Trainer._step"),
          ("evaluate", "pab_framework.trainer", "evaluate"),
          ("checkpoints", "pab_framework.checkpointing", "Checkpointer.save"),
          ("fit", "pab_framework.trainer", "Trainer.fit"),
          ("save_model", "pab_framework.context", "StageContext.save_model"))


def time_phases(acc: dict) -> None:
    """Wrap the stage's parts with timers adding into `acc` (for this process's pab runs)."""
    import importlib

    for label, mod, attr in PHASES:
        owner = importlib.import_module(mod)
        *cls, name = attr.split(".")
        if cls:
            owner = getattr(owner, cls[0])
        f = getattr(owner, name)

        def timed(*a, _f=f, _label=label, **k):
            t = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                acc[_label] = acc.get(_label, 0.0) + time.perf_counter() - t

        setattr(owner, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a narrow model and fewer images (a minute or two on 2 CPU cores)")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--nproc", type=int, default=1, help="also time `pab run --nproc N` (N > 1) for the scaling")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", choices=["imagefolder", "synthetic"], default="imagefolder")
    ap.add_argument("--model", default="cifar_resnet18", help="a model plugin (cifar_resnet18, resnet50, ...)")
    ap.add_argument("--width", type=int, default=None, help="cifar_resnet18's width (default 64; 16 with --quick)")
    ap.add_argument("--batch", type=int, default=None, help="default 128 (64 with --quick)")
    ap.add_argument("--image-size", type=int, default=32, help="H = W of the images (--data synthetic; imagefolder makes 32x32)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--phases", action="store_true", help="also print where each pab run's time went (model, set-up, steps, evaluation, checkpoints, model.pt)")
    ap.add_argument("--train-size", type=int, default=None, help="training images (default 2048; 384 with --quick); validation: a quarter")
    ap.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                    help="compile both loops this way (pab: runtime.compile)")
    a = ap.parse_args()
    width = a.width or (16 if a.quick else 64)
    batch = a.batch or (64 if a.quick else 128)
    n_train = a.train_size or (384 if a.quick else 2048)
    n_val = max(1, n_train // 4)
    if a.data == "imagefolder" and a.image_size != 32:
        ap.error("--image-size needs --data synthetic (the generated image folder is 32x32)")
    model = {"name": a.model, **({"width": width} if a.model == "cifar_resnet18" else {})}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.data == "imagefolder":
            make_images(tmp / "data", n_train, n_val, a.classes)
            data = {"name": "imagefolder", "root": str(tmp / "data"), "image_size": 32}
        else:
            data = {"name": "synthetic", "image_size": a.image_size, "num_classes": a.classes, "train_size": n_train, "val_size": n_val}
        sd = spec_dict(data, tmp / "runs", model, batch, a.epochs, a.device, a.compile)
        (tmp / "spec.yaml").write_text(dump_yaml(sd))
        spec = load_spec(tmp / "spec.yaml")
        bare(spec, 1)  # warm-up: allocator, kernels, file cache, Bop's compilation
        times = {"bare": [], "pab": []}
        split = {"bare": [], "pab": []}  # (seconds per epoch, fixed seconds) of every run
        phase_runs: list[dict] = []
        live: dict = {}
        compile_s: dict = {"bare": [], "pab": []}
        if a.phases:
            time_phases(live)
        for r in range(a.reps):  # ABBA order: a drift in the machine's load hits both alike
            for which in (("bare", "pab") if r % 2 == 0 else ("pab", "bare")):
                live.clear()
                ep: list = []
                s, n = bare(spec, a.epochs, live, ep) if which == "bare" else pab(spec, ep, live)
                if "compile_s" in live:
                    compile_s[which].append(live.pop("compile_s"))
                times[which].append(n / s)
                warm = ep[1:] if a.compile != "none" and len(ep) > 1 else ep  # compiled: the first epoch compiles
                split[which].append((sum(warm) / len(warm), s - sum(ep)))
                if a.phases:
                    phase_runs.append({"run": which, "wall": s, **live})
        bare_img_s, pab_img_s = max(times["bare"]), max(times["pab"])
        rows = [("bare loop", bare_img_s, times["bare"]), ("pab train stage", pab_img_s, times["pab"])]
        figs = {"model": a.model, "data": a.data, "batch": batch, "image_size": a.image_size if a.data == "synthetic" else 32,
                "device": a.device, "bare_img_s": round(bare_img_s, 2), "pab_img_s": round(pab_img_s, 2),
                "overhead": round(bare_img_s / pab_img_s - 1, 4)}
        (b_ep, b_fix), (p_ep, p_fix) = (min(split[k]) for k in ("bare", "pab"))  # the fastest epochs of either
        figs.update({"bare_epoch_s": round(b_ep, 4), "pab_epoch_s": round(p_ep, 4), "epoch_overhead": round(p_ep / b_ep - 1, 4),
                     "bare_fixed_s": round(min(f for _, f in split["bare"]), 3), "pab_fixed_s": round(min(f for _, f in split["pab"]), 3)})
        if a.compile != "none":
            figs.update({"compile": a.compile, **{f"{k}_compile_s": round(min(v), 2) for k, v in compile_s.items() if v}})
        if a.nproc > 1:
            env = dict(os.environ)
            env.pop("WORLD_SIZE", None)
            best = 0.0
            for _ in range(max(1, a.reps - 1)):
                p = subprocess.run([sys.executable, "-m", "pab_framework", "run", str(tmp / "spec.yaml"), "--nproc", str(a.nproc), "--force",
                                    "--progress", "none"], cwd=ROOT, env=env, capture_output=True, text=True)
                if p.returncode != 0:
                    sys.exit(f"pab run --nproc {a.nproc} failed:\n{p.stderr[-3000:]}")
                (res,) = (tmp / "runs" / "throughput").glob("train-*/result.json")
                best = max(best, n_train * a.epochs / json.loads(res.read_text())["wall_s"])
            rows.append((f"pab train stage, {a.nproc} processes", best, []))
            figs.update({f"pab_img_s_nproc{a.nproc}": round(best, 2), "scaling": round(best / pab_img_s, 3)})
    what = f"{a.model}" + (f" (width {width})" if a.model == "cifar_resnet18" else "")
    print(f"{what}, {n_train} training + {n_val} validation images of {figs['image_size']}x{figs['image_size']} ({a.data}), "
          f"batch {batch}, {a.epochs} epochs, device {a.device}, torch threads {torch.get_num_threads()}")
    print(f"{'':32} {'images/s (best)':>16}   all repetitions")
    for name, v, allv in rows:
        print(f"{name:32} {v:16.2f}   {' '.join(f'{x:.2f}' for x in allv)}")
    print(f"overhead bare/pab - 1 = {figs['overhead']:+.2%} (goal <= +5%)" + (f"; scaling with {a.nproc} processes x{figs['scaling']}" if a.nproc > 1 else ""))
    print(f"split: an epoch (training + validation) takes {figs['bare_epoch_s']:.3f} s bare, {figs['pab_epoch_s']:.3f} s in pab "
          f"({figs['epoch_overhead']:+.2%}); fixed seconds per run around the epochs: bare {figs['bare_fixed_s']:.3f}, "
          f"pab {figs['pab_fixed_s']:.3f} (best of each)")
    if a.compile != "none":
        print(f"compiled (mode {a.compile}) both: the first step (compiling) takes {figs.get('bare_compile_s', 0):.1f} s bare, "
              f"{figs.get('pab_compile_s', 0):.1f} s in pab (fastest of each); the epoch figures leave the first epoch out")
    if a.phases:
        labels = ["wall"] + [p[0] for p in PHASES]
        print("seconds by phase, every run (pab: steps, evaluate, checkpoints are inside fit; bare: its training loop"
              " (batches fetched inside it) and its validation; pab's steps leave batch fetching out)")
        print("       " + " ".join(f"{k:>13}" for k in labels))
        for r in phase_runs:
            print(f"  {r['run']:5}" + " ".join(f"{r[k]:13.3f}" if k in r else f"{'':13}" for k in labels))
        figs["phases"] = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in phase_runs]
    print(json.dumps(figs))


if __name__ == "__main__":
    main()
