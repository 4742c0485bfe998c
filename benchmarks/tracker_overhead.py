"""What `runtime.loggers: [mlflow]` costs the quickstart's train stage (goal: at most 2 %).

In one process: configs/quickstart.yaml (prune stage computed once and reused), its train stage
computed again and again, without trackers and with MLflow logging to a SQLite store in a
temporary folder, alternating (the order swapped every pair). For each run: the train stage's own
seconds (result.json's wall_s), the seconds of the whole `run_spec` (the train stage plus reaching
the tracker before it and its last figures, files and status after it), and the seconds the
training loop itself spent handing figures to the trackers (the Tracking callback's calls), per
epoch, and the CPU seconds MLflow's hooks took on the tracker's own thread (what the tracker can
take from training at most, were every core busy: a figure far steadier than the difference of
two noisy run times). The first MLflow run (importing MLflow and setting up the store, once per
process) is timed apart and left out of the pairs. Prints a table and, as its last line, one
JSON object.

    python benchmarks/tracker_overhead.py [--pairs 3] [--device cpu] [--epochs 15]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pab_framework import artifacts  # noqa: E402
from pab_framework.pipeline import run_spec  # noqa: E402
from pab_framework.progress import Reporter  # noqa: E402
from pab_framework.specification import load_spec  # noqa: E402
from pab_framework.tracking import Trackers  # noqa: E402
from pab_plugins.loggers.mlflow_tracker import MLflow  # noqa: E402


class Timed:
    """The seconds (by `clock`) spent in the methods `names` of `cls`, summed since the last `take`:
    the real methods, timed around."""

    def __init__(self, cls: type, names: tuple[str, ...], clock=time.perf_counter):
        self.seconds, self.clock = 0.0, clock
        for name in names:
            setattr(cls, name, self._timed(getattr(cls, name)))

    def _timed(self, real):
        def timed(*args, **kwargs):
            t0 = self.clock()
            try:
                return real(*args, **kwargs)
            finally:
                self.seconds += self.clock() - t0

        return timed

    def take(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s


def train_once(spec_path: Path, overrides: list[str], clock: Timed, cpu: Timed) -> dict:
    """Compute the train stage again (its result removed; the prune stage reused): its seconds."""
    spec = load_spec(spec_path, overrides)
    for d in spec.output_root.glob("train-*"):
        (d / artifacts.RESULT).unlink(missing_ok=True)
    clock.take()
    cpu.take()
    t0 = time.perf_counter()
    outcomes = {o.stage_id: o for o in run_spec(spec, reporter=Reporter(mode="none"))}
    whole = time.perf_counter() - t0
    train = outcomes["train"]
    assert not train.reused and outcomes["prune"].reused
    return {"train_s": float(train.result["wall_s"]), "run_s": whole, "loop_s": clock.take(), "epochs": int(train.result["epochs"]),
            "hooks_cpu_s": cpu.take()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, default=15, help="the quickstart's own: 15")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pab-tracker-overhead-"))
    spec_path = ROOT / "configs" / "quickstart.yaml"
    base = [f"runtime.output_dir={tmp / 'runs'}", f"runtime.device={args.device}", "runtime.progress=none", f"stages.train.epochs={args.epochs}"]
    kinds = {"none": base, "mlflow": base + [f"runtime.loggers=[jsonl, {{name: mlflow, tracking_uri: 'sqlite:///{tmp / 'mlflow.db'}'}}]"]}
    # the loop's time in the Tracking callback's calls; the CPU time of MLflow's hooks on the tracker's thread
    clock = Timed(Trackers, ("start", "epoch"))
    cpu = Timed(MLflow, ("start", "log_epochs", "log_artifacts", "finish"), clock=time.thread_time)
    run_spec(load_spec(spec_path, base), reporter=Reporter(mode="none"))  # the prune stage, and a first train stage (warm-up)
    first = train_once(spec_path, kinds["mlflow"], clock, cpu)  # MLflow imported, its store set up: once per process
    rows: dict[str, list[dict]] = {"none": [], "mlflow": []}
    for i in range(args.pairs):
        for kind in (("none", "mlflow") if i % 2 == 0 else ("mlflow", "none")):
            rows[kind].append(train_once(spec_path, kinds[kind], clock, cpu))
            r = rows[kind][-1]
            print(f"pair {i + 1} {kind:<7} train stage {r['train_s']:7.2f} s   run {r['run_s']:7.2f} s   "
                  f"loop in tracker calls {1000 * r['loop_s'] / r['epochs']:.3f} ms/epoch   MLflow hooks {r['hooks_cpu_s']:.3f} s CPU", flush=True)
    train = [m["train_s"] / n["train_s"] for n, m in zip(rows["none"], rows["mlflow"])]
    whole = [m["run_s"] / n["run_s"] for n, m in zip(rows["none"], rows["mlflow"])]
    loop_ms = [1000 * m["loop_s"] / m["epochs"] for m in rows["mlflow"]]
    hooks = [m["hooks_cpu_s"] / n["train_s"] for n, m in zip(rows["none"], rows["mlflow"])]
    print()
    print(f"{'':<34}{'median':>10}{'min':>10}{'max':>10}")
    print(f"{'train stage, mlflow / none':<34}{statistics.median(train):>10.4f}{min(train):>10.4f}{max(train):>10.4f}")
    print(f"{'whole run_spec, mlflow / none':<34}{statistics.median(whole):>10.4f}{min(whole):>10.4f}{max(whole):>10.4f}")
    print(f"{'loop in tracker calls, ms/epoch':<34}{statistics.median(loop_ms):>10.3f}{min(loop_ms):>10.3f}{max(loop_ms):>10.3f}")
    print(f"{'MLflow hooks CPU / train stage':<34}{statistics.median(hooks):>10.4f}{min(hooks):>10.4f}{max(hooks):>10.4f}")
    print(f"first MLflow run of the process: run {first['run_s']:.2f} s for a {first['train_s']:.2f} s train stage "
          f"(importing MLflow, setting up the store)")
    print(json.dumps({"pairs": args.pairs, "epochs": args.epochs, "device": args.device,
                      "train_s_none": [round(r["train_s"], 3) for r in rows["none"]], "train_s_mlflow": [round(r["train_s"], 3) for r in rows["mlflow"]],
                      "train_ratio_median": round(statistics.median(train), 4), "train_overhead_pct_median": round(100 * (statistics.median(train) - 1), 2),
                      "run_ratio_median": round(statistics.median(whole), 4), "run_overhead_pct_median": round(100 * (statistics.median(whole) - 1), 2),
                      "loop_ms_per_epoch_max": round(max(loop_ms), 3), "hooks_cpu_ratio_max": round(max(hooks), 4), "first_run_s": round(first["run_s"], 3),
                      "first_train_s": round(first["train_s"], 3)}))


if __name__ == "__main__":
    main()
