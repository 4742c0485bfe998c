"""runtime.compile (pab_framework/compiling.py): the setting, what is refused where it cannot work,
a compiled train stage against an eager one (masks, figures, eager keys, pruned weights zero
after every step), no recompilation after the first epoch, resume across compiled and eager,
DDP and bf16 compiled on the CPU.

The fast tests compile with `backend: aot_eager` (dynamo traces and AOT autograd splits forward
and backward exactly as with Inductor; only Inductor's code generation, seconds per graph on two
cores, is left out), and one tiny MLP with Inductor; the quickstart and Inductor under DDP and
bf16 are slow."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from rich.console import Console
from torch._dynamo.utils import counters

import pab_faults
from conftest import CONFIGS, ROOT, with_hooks
from pab_framework import artifacts, compiling
from pab_framework.callbacks import Callback
from pab_framework.checkpoint import Interrupted
from pab_framework.distributed import DistInfo
from pab_framework.errors import SpecError
from pab_framework.graph import stage_keys
from pab_framework.pipeline import check, run_spec
from pab_framework.progress import Reporter
from pab_framework.specification import load_spec
from pab_framework.specification.models import CompileSpec
from pab_framework.trainer import Trainer

# 1438 training digits in batches of 119: 12 full steps and one of 10 (a convolution on the CPU
# guards on a batch under 16: the last batch is a second shape); 359 validation digits: 3 x 119 + 2
SPEC = """\
name: comp
seed: 0
model: {name: digits_cnn, width: 4, init: kaiming_normal}
data: {name: digits, batch_size: 119}
stages:
  prune:
    kind: prune
    pruner: {name: synflow, density: 0.3, iterations: 2}
  train:
    kind: train
    after: [prune]
    epochs: 3
    optimizer:
      name: bop
      ar: 1.0e-3
      tau: 1.0e-6
      ar_decay: {every: 1, factor: 0.5}
      rest: {name: sgd, lr: 0.1, momentum: 0.9, schedule: cosine}
runtime: {device: cpu, output_dir: runs, progress: plain}
"""
# edge-popup: a new top-k mask at every step, trained by SGD with a cosine schedule
EDGE_POPUP = """\
  popup:
    kind: train
    epochs: 3
    transforms: [{name: edge_popup, density: 0.5}]
    optimizer: {name: sgd, lr: 0.1, momentum: 0.9, schedule: cosine}
"""
# Bop with PSG's weight gradients (a registered operator), from the same pruned model
PSG = """\
  psg:
    kind: train
    after: [prune]
    epochs: 3
    optimizer: {name: bop, ar: 1.0e-3, tau: 1.0e-6, ar_decay: {every: 1, factor: 0.5}, rest: {name: sgd, lr: 0.1, schedule: cosine}}
    quantizer: {name: psg, msb_bits: 8, msb_bits_grad: 16, threshold: 1.0e-7, threshold_mode: relative, sparsify: true}
"""
AOT = "{backend: aot_eager}"


def _spec(write_spec, text=SPEC, name="spec.yaml"):
    return write_spec(text, name)


def _run(spec_path, sets=(), **kw):
    """run_spec in this process; (outcomes by stage, the log)."""
    buf = io.StringIO()
    reporter = Reporter(Console(file=buf, width=200, no_color=True), mode="plain")
    outs = run_spec(load_spec(spec_path, list(sets)), reporter=reporter, **kw)
    return {o.stage_id: o for o in outs}, buf.getvalue()


class Watch(Callback):
    """Checks after every step that the pruned weights are exactly zero (not edge-popup's: its
    weights stay as initialised, the mask applies in its forward); counts dynamo's graphs at every
    epoch's end; keeps the model to look at afterwards."""

    def __init__(self):
        self.graphs: dict[str, list[int]] = {}
        self.steps = 0

    def setup(self, trainer, stack) -> None:
        self.model, self.stage_id = trainer.model, trainer.stage.stage_id
        self.graphs[self.stage_id] = [counters["stats"]["unique_graphs"]]

    def on_step_end(self, trainer) -> None:
        self.steps += 1
        if trainer.stage.stage_id == "popup":
            return
        params = dict(trainer.model.named_parameters())
        for name, m in trainer.masks.as_dict().items():
            assert not params[name].detach()[~m].any(), f"{name}: a pruned weight is not zero after step {trainer.step}"

    def on_epoch_end(self, trainer, figures) -> None:
        self.graphs[self.stage_id].append(counters["stats"]["unique_graphs"])


def watch(monkeypatch) -> Watch:
    """A Watch in every Trainer of this test (first among the callbacks)."""
    w = Watch()
    real = Trainer.fit

    def fit(self):
        self.callbacks.insert(0, w)
        return real(self)

    monkeypatch.setattr(Trainer, "fit", fit)
    return w


def _model_file(out) -> tuple[dict, dict]:
    return artifacts.load_model_artifact(out.dir / artifacts.MODEL)


# --------------------------------------------------------------------------- the setting
def test_the_setting_its_forms_and_its_errors(write_spec):
    rt = load_spec(_spec(write_spec)).runtime
    assert rt.compile == "none" and rt.compile_options() is None
    s = load_spec(_spec(write_spec), ["runtime.compile=reduce-overhead"])
    assert s.runtime.compile_options() == CompileSpec(mode="reduce-overhead")
    s = load_spec(_spec(write_spec), ["runtime.compile={mode: max-autotune, fullgraph: true, dynamic: false}"])
    assert s.runtime.compile_options() == CompileSpec(mode="max-autotune", fullgraph=True, dynamic=False)
    assert s.resolved_dict()["runtime"]["compile"]["mode"] == "max-autotune"
    with pytest.raises(SpecError, match=r"--set runtime.compile=fast, runtime.compile: Input should be 'none', 'default', 'reduce-overhead'"):
        load_spec(_spec(write_spec), ["runtime.compile=fast"])
    bad = write_spec(SPEC.replace("progress: plain}", "progress: plain, compile: {mode: default, fulgraph: true}}"), "bad.yaml")
    with pytest.raises(SpecError, match=r"bad.yaml:\d+, runtime.compile.fulgraph: unknown key 'fulgraph'; did you mean 'fullgraph'\?") as e:
        load_spec(bad)
    assert "literal" not in str(e.value)  # the mapping's own error alone, not the string form's too
    with pytest.raises(SpecError, match=r"runtime.compile: .*mode 'reduce-overhead' is Inductor's: with backend 'aot_eager' leave mode out"):
        load_spec(_spec(write_spec), ["runtime.compile={mode: reduce-overhead, backend: aot_eager}"])


def test_compiled_or_eager_is_the_same_stage(write_spec):
    """runtime.compile is out of every key: a run interrupted compiled resumes eager in the same directory."""
    base = stage_keys(load_spec(_spec(write_spec)))
    for v in ("default", "max-autotune", AOT, "{mode: default, fullgraph: true, dynamic: true}"):
        assert stage_keys(load_spec(_spec(write_spec), [f"runtime.compile={v}"])) == base, v


def test_what_cannot_work_is_refused_with_its_place(write_spec, monkeypatch):
    cpu = torch.device("cpu")
    s = load_spec(write_spec(SPEC.replace("progress: plain}", "progress: plain,\n  compile: reduce-overhead}")))
    with pytest.raises(SpecError, match=r"spec.yaml:\d+, runtime.compile: reduce-overhead captures CUDA graphs, which need a CUDA device; "
                                        r"this run computes on the CPU"):
        check(s, DistInfo(), cpu)
    assert compiling.problems(s, torch.device("cuda", 0)) == []
    # Inductor on the CPU needs a C++ compiler; tracing backends do not
    monkeypatch.setattr(compiling, "_cpp_compiler", lambda: None)
    s = load_spec(_spec(write_spec), ["runtime.compile=default", "runtime.amp=fp16"])
    msgs = [p.render() for p in compiling.problems(s, cpu)]
    assert len(msgs) == 1 and msgs[0].startswith("--set runtime.compile=default, runtime.compile: Inductor compiles for the CPU with a C++ compiler")
    with pytest.raises(SpecError) as e:  # every problem at once, each placed where it is written
        check(s, DistInfo(), cpu)
    assert [p.where() for p in e.value.problems] == ["--set runtime.amp=fp16, runtime.amp", "--set runtime.compile=default, runtime.compile"]
    assert compiling.problems(load_spec(_spec(write_spec), [f"runtime.compile={AOT}"]), cpu) == []


def test_validate_and_run_refuse_cuda_graphs_on_the_cpu(write_spec, monkeypatch):
    from typer.testing import CliRunner

    from pab_framework.cli import app

    spec = _spec(write_spec)
    monkeypatch.chdir(spec.parent)
    for cmd in (["validate", str(spec)], ["run", str(spec)]):
        r = CliRunner().invoke(app, [*cmd, "--set", "runtime.compile=reduce-overhead"], terminal_width=300)
        assert r.exit_code == 2, r.output
        assert "error: invalid spec: --set runtime.compile=reduce-overhead, runtime.compile: reduce-overhead captures CUDA graphs" in r.output
        assert "Traceback" not in r.output
    assert not (spec.parent / "runs").exists()  # refused before any work


# --------------------------------------------------------------------------- a compiled stage
def test_compiled_stage_trains_as_eager_and_compiles_in_its_first_epoch_only(write_spec, monkeypatch):
    """Bop (sign flips, ar halved every epoch, cosine lr), Bop with PSG, and edge-popup (a new
    top-k mask every step), compiled with fullgraph: the same masks and figures as eager, the pruned weights zero
    after every step, model.pt with the eager keys, compile_s and the compiling lines; graphs are
    made in the first epoch (training: full and last batch; evaluation) and none after."""
    spec = _spec(write_spec, SPEC.replace("runtime:", PSG + EDGE_POPUP + "runtime:"))
    eager, _ = _run(spec, ["runtime.output_dir=eager"])
    torch._dynamo.reset()
    w = watch(monkeypatch)
    comp, log = _run(spec, ["runtime.output_dir=compiled", "runtime.compile={backend: aot_eager, fullgraph: true}"])
    assert w.steps == 3 * 3 * 13
    for sid in ("train", "psg", "popup"):
        g = w.graphs[sid]
        assert g[1] - g[0] >= 2, (sid, g)  # compiled: at least a training graph and an evaluation graph
        assert g[1] == g[2] == g[3], (sid, g)  # nothing compiled after the first epoch
        r = comp[sid].result
        assert r["compile_s"] > 0 and "compile_s" not in eager[sid].result
        assert abs(r["val_acc"] - eager[sid].result["val_acc"]) <= 0.01
        ws, wm = _model_file(comp[sid])
        es, em = _model_file(eager[sid])
        assert list(ws) == list(es) and not any("_orig_mod" in k for k in ws)  # the eager keys
        assert wm.keys() == em.keys() and all(torch.equal(wm[k], em[k]) for k in wm), sid  # the same masks
        rows_c, rows_e = (artifacts.read_jsonl(o[sid].dir / artifacts.METRICS) for o in (comp, eager))
        for a, b in zip(rows_c, rows_e):
            assert abs(a["train_loss"] - b["train_loss"]) < 1e-3 and abs(a["val_acc"] - b["val_acc"]) <= 0.01
    assert log.count("compiling the model (backend aot_eager; the first step)...") == 3
    assert log.count("compiling the evaluation pass") == 3 and log.count("compiled the training step in") == 3
    assert "forward" not in w.model.__dict__  # eager again once training ends


def test_compiled_inductor_stage_trains_as_eager(write_spec, monkeypatch):
    """Inductor itself, on a tiny MLP (a few seconds a graph on two cores)."""
    text = SPEC.replace("digits_cnn, width: 4", "mlp, hidden: [16]").replace("epochs: 3", "epochs: 2")
    spec = _spec(write_spec, text)
    eager, _ = _run(spec, ["runtime.output_dir=eager"])
    w = watch(monkeypatch)
    comp, log = _run(spec, ["runtime.output_dir=compiled", "runtime.compile=default"])
    assert "compiling the model (mode default; the first step)..." in log
    g = w.graphs["train"]
    assert g[1] - g[0] >= 2 and g[1] == g[2]
    r, e = comp["train"].result, eager["train"].result
    assert abs(r["val_acc"] - e["val_acc"]) <= 0.01 and r["compile_s"] > 0
    (ws, wm), (es, em) = _model_file(comp["train"]), _model_file(eager["train"])
    assert list(ws) == list(es) and all(torch.equal(wm[k], em[k]) for k in wm)


@pytest.mark.parametrize("first,then", [(AOT, "none"), ("none", AOT)])
def test_a_run_interrupted_resumes_compiled_or_eager(write_spec, monkeypatch, first, then):
    """Stopped at step 17 (epoch 2) in one way, resumed the other way in the same stage directory:
    the masks of an uninterrupted eager run, and its figures."""
    spec = _spec(write_spec)
    whole, _ = _run(spec, ["runtime.output_dir=whole"])
    pab_faults.at("step", 17, lambda trainer: trainer.request_stop("test stop"), monkeypatch.setattr)
    with pytest.raises(Interrupted, match="test stop at epoch 2, step 4"):
        _run(spec, ["runtime.output_dir=cut", f"runtime.compile={first}"])
    monkeypatch.undo()
    out, log = _run(spec, ["runtime.output_dir=cut", f"runtime.compile={then}"])
    assert "resuming train (train) from" in log and out["train"].resumed
    assert out["train"].dir.name == whole["train"].dir.name  # the same stage key
    (cs, cm), (ws, wm) = _model_file(out["train"]), _model_file(whole["train"])
    assert list(cs) == list(ws) and all(torch.equal(cm[k], wm[k]) for k in cm)
    assert abs(out["train"].result["val_acc"] - whole["train"].result["val_acc"]) <= 0.01
    assert ("compile_s" in out["train"].result) == (then != "none")


def test_bf16_autocast_compiled(write_spec):
    spec = _spec(write_spec, SPEC.replace("epochs: 3", "epochs: 2"))
    eager, _ = _run(spec, ["runtime.output_dir=eager", "runtime.amp=bf16"])
    comp, _ = _run(spec, ["runtime.output_dir=compiled", "runtime.amp=bf16", f"runtime.compile={AOT}"])
    assert abs(comp["train"].result["val_acc"] - eager["train"].result["val_acc"]) <= 0.03
    assert comp["train"].result["compile_s"] > 0


def _two_processes(spec, compile_setting: str, out: str):
    e = with_hooks(dict(os.environ))
    e.pop("WORLD_SIZE", None)
    p = subprocess.run([sys.executable, "-m", "pab_framework", "run", str(spec), "--nproc", "2", "--set", f"runtime.output_dir={out}",
                        "--set", f"runtime.compile={compile_setting}"], cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def _ddp_against_one(write_spec, compile_setting: str):
    """DDP (gloo, 2 processes) compiled against one eager process: the ranks agree bitwise, the
    masks are the single process's, the figures close (the quickstart's shape without BatchNorm)."""
    text = SPEC.replace("digits_cnn, width: 4", "mlp, hidden: [32], batchnorm: false").replace("batch_size: 119", "batch_size: 128")
    spec = _spec(write_spec, text)
    one, _ = _run(spec, ["runtime.output_dir=one"])
    p = _two_processes(spec, compile_setting, "two")
    assert "on 2 processes" in p.stdout and "compiling the model" in p.stdout
    (d,) = (spec.parent / "two" / "comp").glob("train-*")
    res = json.loads((d / "result.json").read_text())
    assert res["world_size"] == 2 and res["compile_s"] > 0
    for kind in ("weights", "masks"):
        assert len(set(res["rank_digests"][kind])) == 1
    (s2, m2), (s1, m1) = artifacts.load_model_artifact(d / artifacts.MODEL), _model_file(one["train"])
    assert list(s2) == list(s1) and all(torch.equal(m1[k], m2[k]) for k in m1)
    assert abs(res["val_acc"] - one["train"].result["val_acc"]) <= 0.02


def test_ddp_compiled_on_two_processes(write_spec):
    _ddp_against_one(write_spec, AOT)


# --------------------------------------------------------------------------- compiling in place
def test_each_model_has_its_own_compiled_graphs():
    """Models compiled one after another in one process keep compiling (dynamo's recompile limit
    counts per code object: one shared by every model would stop compiling after a few and run
    them eagerly, silently), and the module stays itself: the eager keys, forward restored."""
    torch._dynamo.reset()
    opts = CompileSpec(backend="eager")
    limit = torch._dynamo.config.recompile_limit
    for i in range(limit):  # each model: a training graph and an evaluation graph
        m = nn.Sequential(nn.Linear(8, 4 + i), nn.BatchNorm1d(4 + i), nn.ReLU(), nn.Linear(4 + i, 3))
        keys = list(m.state_dict())
        undo = compiling.compile_forward(m, opts, torch.device("cpu"))
        before = counters["stats"]["unique_graphs"]
        for bs in (32, 7):  # a smaller batch reuses the graph (the batch dimension is dynamic)
            m(torch.randn(bs, 8)).sum().backward()
        m.eval()
        with torch.no_grad():
            m(torch.randn(5, 8))
        assert counters["stats"]["unique_graphs"] - before == 2, i
        assert list(m.state_dict()) == keys and "forward" in m.__dict__
        undo()
        assert "forward" not in m.__dict__


# --------------------------------------------------------------------------- slow: Inductor
@pytest.mark.slow
def test_quickstart_compiled_as_eager(tmp_path, monkeypatch):
    """The quickstart (PSG, Bop) compiled with Inductor: the same masks as eager, val_acc within
    0.01, pruned weights zero after every step, nothing compiled after the first epoch."""
    qs = CONFIGS / "quickstart.yaml"
    sets = ["runtime.device=cpu", "stages.train.epochs=4", "stages.prune.pruner.iterations=20"]
    eager, _ = _run(qs, [*sets, f"runtime.output_dir={tmp_path / 'eager'}"])
    w = watch(monkeypatch)
    comp, log = _run(qs, [*sets, f"runtime.output_dir={tmp_path / 'compiled'}", "runtime.compile=default"])
    g = w.graphs["train"]
    assert g[1] - g[0] >= 2 and g[1] == g[2] == g[3] == g[4], g
    assert abs(comp["train"].result["val_acc"] - eager["train"].result["val_acc"]) <= 0.01
    (cs, cm), (es, em) = _model_file(comp["train"]), _model_file(eager["train"])
    assert list(cs) == list(es) and all(torch.equal(cm[k], em[k]) for k in cm)
    assert comp["train"].result["compile_s"] > 0 and "compiling the model (mode default; the first step)..." in log


@pytest.mark.slow
def test_ddp_compiled_with_inductor(write_spec):
    _ddp_against_one(write_spec, "default")


@pytest.mark.slow
def test_bf16_autocast_compiled_with_inductor(write_spec):
    spec = _spec(write_spec, SPEC.replace("epochs: 3", "epochs: 2"))
    eager, _ = _run(spec, ["runtime.output_dir=eager", "runtime.amp=bf16"])
    comp, _ = _run(spec, ["runtime.output_dir=compiled", "runtime.amp=bf16", "runtime.compile=default"])
    assert abs(comp["train"].result["val_acc"] - eager["train"].result["val_acc"]) <= 0.03


@pytest.mark.slow
def test_train_throughput_compiled():
    """benchmarks/train_throughput.py --compile: both loops compiled, the figures in its last line."""
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--device", "cpu", "--data", "synthetic",
                        "--model", "cifar_resnet18", "--width", "8", "--batch", "32", "--train-size", "72", "--reps", "1", "--epochs", "2",
                        "--compile", "default"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    figs = json.loads(p.stdout.strip().splitlines()[-1])
    assert figs["compile"] == "default" and figs["bare_compile_s"] > 0 and figs["pab_compile_s"] > 0
    assert figs["pab_epoch_s"] > 0 and figs["bare_epoch_s"] > 0
