"""Every GPU figure of this project in one run (goal: under 5 minutes on one GPU).

Each part runs in its own process with a time limit; a part that fails or runs out of time is
recorded (its status and the tail of its output) and the suite goes on:

  bop_step      benchmarks/bop_step.py: Bop's step on ResNet-50's parameter set against the
                original-style loop and the memory floor
  psg_step      benchmarks/psg_step.py: PSG's training step (its models and precisions)
  train_cifar   benchmarks/train_throughput.py on synthetic data: train-stage images/s against a
                bare loop, cifar_resnet18 width 64, batch 128, 32x32, 2 epochs of 50,000 images
  train_r50     the same for resnet50, batch 64, 224x224, 1000 classes, 2 epochs of 3,200 images
  prune         benchmarks/prune_speed.py: SynFlow, 100 rounds, on cifar_resnet18 and ResNet-50
                against the original-style loop (times, masks_equal)
  tests         pytest tests/test_cuda.py

Named in `--parts` only (compiled, issue 25's figures; each compiles its models first):
  psg_step_compiled     psg_step.py with both models compiled, `--compile reduce-overhead` (CUDA
                        graphs): PSG/plain per model and precision (goal <= 1.10)
  train_cifar_compiled  train_cifar with both loops compiled the same way (reduce-overhead): the
                        train stage's per-epoch overhead over a bare compiled loop (goal <= 3 %)
  train_r50_compiled    train_r50 likewise

Prints a table, then as its very last line one JSON object gathering every part's figures (each
benchmark's own last line), statuses and times. A part named twice in `--parts` runs twice (the
second run's record is `<part>#2`): two runs of a figure from one call, as a goal needs. `--quick`
makes every part small, to prove the plumbing on a CPU (`--device cpu --quick`); its figures
mean nothing.

    python benchmarks/gpu_suite.py [--device cuda] [--quick] [--budget 540] [--parts bop_step,tests] [--json out.json] [--logs DIR]
    python benchmarks/gpu_suite.py --parts psg_step_compiled,train_cifar_compiled,bop_step,bop_step --budget 780
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
GOAL_S = 300
COMPILED = ("psg_step_compiled", "train_cifar_compiled", "train_r50_compiled")  # run when named in --parts


def parts(device: str, quick: bool) -> dict[str, tuple[list[str], int]]:
    """name -> (command, time limit in seconds): the default parts, then the COMPILED ones."""
    plan = _parts(device, quick)
    # the same parts compiled: CUDA graphs on CUDA; elsewhere (a CPU's --quick) Inductor's default mode
    mode = ["--compile", "reduce-overhead" if device.startswith("cuda") else "default"]
    plan["psg_step_compiled"] = ([*plan["psg_step"][0], *mode], 300 if quick else 360)
    plan["train_cifar_compiled"] = ([*plan["train_cifar"][0], *mode, *(["--epochs", "2"] if quick else [])], 400 if quick else 300)
    plan["train_r50_compiled"] = ([*plan["train_r50"][0], *mode, *(["--epochs", "2"] if quick else [])], 400 if quick else 300)
    return plan


def _parts(device: str, quick: bool) -> dict[str, tuple[list[str], int]]:
    py = sys.executable
    dev = ["--device", device]
    if quick:  # tiny: the plumbing, not the figures
        return {
            "bop_step": ([py, str(BENCH / "bop_step.py"), *dev, "--reps", "2"], 300),
            "psg_step": ([py, str(BENCH / "psg_step.py"), *dev, "--tiny", "--reps", "2", "--warmup", "1"], 300),
            "train_cifar": ([py, str(BENCH / "train_throughput.py"), *dev, "--data", "synthetic", "--model", "cifar_resnet18",
                             "--width", "8", "--batch", "32", "--train-size", "64", "--reps", "1", "--epochs", "1"], 300),
            "train_r50": ([py, str(BENCH / "train_throughput.py"), *dev, "--data", "synthetic", "--model", "resnet50", "--batch", "4",
                           "--image-size", "64", "--classes", "1000", "--train-size", "8", "--reps", "1", "--epochs", "1"], 300),
            "prune": ([py, str(BENCH / "prune_speed.py"), *dev, "--iterations", "2", "--resnet50-baseline", "--no-grasp"], 400),
            "tests": ([py, "-m", "pytest", "-v", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_cuda.py")], 300),
        }
    return {
        "bop_step": ([py, str(BENCH / "bop_step.py"), *dev], 90),
        "psg_step": ([py, str(BENCH / "psg_step.py"), *dev], 120),
        # a CIFAR-10 epoch (50,000 images, a few seconds on one GPU): a stage's fixed costs (model.pt, a
        # checkpoint per epoch) weigh on it as in real use, not as on a run of a few hundred steps
        "train_cifar": ([py, str(BENCH / "train_throughput.py"), *dev, "--data", "synthetic", "--model", "cifar_resnet18",
                         "--width", "64", "--batch", "128", "--train-size", "50000", "--reps", "2", "--epochs", "2", "--phases"], 150),
        "train_r50": ([py, str(BENCH / "train_throughput.py"), *dev, "--data", "synthetic", "--model", "resnet50", "--batch", "64",
                       "--image-size", "224", "--classes", "1000", "--train-size", "3200", "--reps", "2", "--epochs", "2", "--phases"], 150),
        "prune": ([py, str(BENCH / "prune_speed.py"), *dev, "--iterations", "100", "--resnet50-baseline", "--no-grasp"], 120),
        "tests": ([py, "-m", "pytest", "-v", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_cuda.py")], 300),
    }


def choose(plan: dict, names: str | None) -> dict:
    """The runs of `--parts` (comma-separated, in that order; a part named twice runs twice, the
    second as `<part>#2`), or without it every part but the COMPILED ones."""
    if not names:
        return {k: v for k, v in plan.items() if k not in COMPILED}
    want = [p.strip() for p in names.split(",") if p.strip()]
    unknown = [p for p in want if p not in plan]
    if unknown:
        raise ValueError(f"unknown part(s) {', '.join(unknown)}; known: {', '.join(plan)}")
    runs: dict = {}
    for k in want:  # in the order given: put first what matters most; a repeated part is a second run
        n = sum(1 for r in runs if r.split("#")[0] == k)
        runs[k if n == 0 else f"{k}#{n + 1}"] = plan[k]
    return runs


def _text(b) -> str:
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


def last_json(out: str) -> dict | None:
    """The benchmark's last line, when it is one JSON object."""
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    try:
        v = json.loads(lines[-1])
    except ValueError:
        return None
    return v if isinstance(v, dict) else None


TEST_LINE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def test_figures(out: str) -> dict:
    """Per-test outcomes from pytest -v output (also from a run cut short)."""
    outcome: dict[str, str] = {}
    for ln in out.splitlines():
        m = TEST_LINE.match(ln.strip())
        if m:
            outcome[m.group(1).split("::", 1)[1]] = m.group(2).lower()
    by = lambda s: sorted(t for t, o in outcome.items() if o == s)  # noqa: E731
    return {"passed": len(by("passed")), "failed": by("failed") + by("error"), "skipped": len(by("skipped")), "outcomes": outcome}


def run_part(name: str, cmd: list[str], limit: float, env: dict, logs: Path | None = None) -> dict:
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=limit)
        out, err, rc, status = _text(p.stdout), _text(p.stderr), p.returncode, None
    except subprocess.TimeoutExpired as e:
        out, err, rc, status = _text(e.stdout), _text(e.stderr), None, "timeout"
    wall = time.perf_counter() - t
    if logs is not None:  # the part's whole output, for reading a failure afterwards
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"{name.replace('#', '-')}.log").write_text(f"$ {' '.join(cmd)}\n{out}\n--- stderr ---\n{err}")
    rec: dict = {"wall_s": round(wall, 1), "limit_s": round(limit)}
    if name.split("#")[0] == "tests":
        figs = test_figures(out)
        ok = rc == 0 or (rc == 5 and not figs["failed"])  # 5: nothing collected
        rec["figures"] = figs
    else:
        figs = last_json(out)
        ok = rc == 0 and figs is not None
        if figs is not None:
            rec["figures"] = figs
    rec["status"] = status or ("ok" if ok else "failed")
    if rec["status"] != "ok":
        rec["rc"] = rc
        rec["tail"] = (out + "\n" + err).strip()[-1500:]
    return rec


def summary(name: str, rec: dict) -> str:
    name = name.split("#")[0]
    f = rec.get("figures") or {}
    if name == "tests":
        return f"{f.get('passed', 0)} passed, {len(f.get('failed', []))} failed, {f.get('skipped', 0)} skipped" + \
            (f" ({', '.join(f['failed'][:4])})" if f.get("failed") else "")
    train = ("bare_img_s", "pab_img_s", "overhead", "epoch_overhead", "bare_fixed_s", "pab_fixed_s", "bare_compile_s", "pab_compile_s")
    name = name.removesuffix("_compiled")
    keys = {"bop_step": None, "psg_step": None, "train_cifar": train, "train_r50": train,
            "prune": ("baseline_s", "ours_s", "speedup", "masks_equal", "resnet50_baseline_s", "resnet50_s", "resnet50_speedup", "resnet50_masks_equal")}[name]
    items = [(k, v) for k, v in f.items() if (keys is None or k in keys) and not isinstance(v, (dict, list))]
    return ", ".join(f"{k} {v}" for k, v in items[:8])


def device_info(device: str) -> dict:
    import torch

    info = {"torch": torch.__version__, "python": sys.version.split()[0]}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["gpu_count"] = torch.cuda.device_count()
    elif device.startswith("cuda"):
        info["gpu"] = None
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="every part tiny: proves the plumbing (e.g. on a CPU); the figures mean nothing")
    ap.add_argument("--budget", type=float, default=540, help="seconds for the whole suite; a part gets at most what is left")
    ap.add_argument("--parts", default=None, help="comma-separated parts, run in the order given (a part named twice runs twice), from: "
                    + ", ".join(parts("cuda", False)) + f" (default: all but {', '.join(COMPILED)})")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON object to this file")
    ap.add_argument("--logs", type=Path, default=None, help="write each part's whole output to DIR/<part>.log")
    a = ap.parse_args()
    try:
        plan = choose(parts(a.device, a.quick), a.parts)
    except ValueError as e:
        ap.error(str(e))
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    env.setdefault("CI", "1")  # plain progress lines
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    t0 = time.perf_counter()
    deadline = t0 + a.budget
    results: dict[str, dict] = {}
    print(f"gpu_suite: device {a.device}{' (quick)' if a.quick else ''}, budget {a.budget:.0f} s, parts: {', '.join(plan)}", flush=True)
    for name, (cmd, limit) in plan.items():
        left = deadline - time.perf_counter()
        if left < 5:
            results[name] = {"status": "skipped", "reason": "out of suite time (--budget)"}
        else:
            results[name] = run_part(name, cmd, min(limit, left), env, a.logs)
        r = results[name]
        print(f"  {name:12} {r['status']:8} {r.get('wall_s', 0):7.1f} s  {summary(name, r) if 'figures' in r else r.get('reason', '')}", flush=True)
        if r["status"] in ("failed", "timeout"):
            tail = r.get("tail", "").splitlines()[-3:]
            for ln in tail:
                print(f"      | {ln[:160]}")
    wall = time.perf_counter() - t0
    out = {"device": a.device, "quick": a.quick, **device_info(a.device), "wall_s": round(wall, 1), "goal_s": GOAL_S,
           "under_goal": None if a.quick else wall <= GOAL_S, "ok": all(r["status"] == "ok" for r in results.values()), "parts": results}
    print(f"total {wall:.1f} s (goal <= {GOAL_S} s on one GPU); "
          f"{sum(r['status'] == 'ok' for r in results.values())}/{len(results)} parts ok")
    line = json.dumps(out)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=a.json.parent, delete=False, suffix=".tmp") as f:
            f.write(line + "\n")
        os.chmod(f.name, 0o666 & ~_umask())
        os.replace(f.name, a.json)
    print(line)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


if __name__ == "__main__":
    main()
