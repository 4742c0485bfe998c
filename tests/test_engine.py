"""The engine's parts on their own: stage-owned keys, the metrics sink, the live masks, the
Trainer reused by a stage kind of its own, and transforms composed in order."""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn as nn

from conftest import TINY_SPEC
from pab_framework.errors import TrainingError
from pab_framework.graph import stage_keys
from pab_framework.masks import MaskState
from pab_framework.metrics import MetricsSink
from pab_framework.specification import load_spec

PSG_SPEC = TINY_SPEC.replace("    optimizer: {name: bop, ar: 1.0e-3, tau: 1.0e-6}\n",
                             "    optimizer: {name: bop, ar: 1.0e-3, tau: 1.0e-6}\n    quantizer: {name: psg}\n")


# --------------------------------------------------------------------------- stage-owned keys
def keys(write_spec, text: str, *sets: str) -> dict[str, str]:
    return stage_keys(load_spec(write_spec(text), list(sets)))


def test_batch_sizes_reuse_the_prune_stage_and_rekey_the_train_stage(write_spec):
    base = keys(write_spec, TINY_SPEC)
    for change in ("data.batch_size=64", "data.eval_batch_size=50"):
        got = keys(write_spec, TINY_SPEC, change)
        assert got["prune"] == base["prune"], change  # SynFlow never reads the training batches
        assert got["train"] != base["train"], change
    # an evaluation batch size equal to the one in effect is no change at all
    assert keys(write_spec, TINY_SPEC, "data.eval_batch_size=128") == base


def test_data_model_and_pruner_rekey_both(write_spec):
    base = keys(write_spec, TINY_SPEC)
    for change in ("data.name=cifar10", "model.hidden=[16]", "model.init=kaiming_uniform", "stages.prune.pruner.name=magnitude",
                   "stages.prune.pruner.density=0.5", "seed=1"):
        text = TINY_SPEC.replace("model: {name: mlp, hidden: [32], init: kaiming_normal}", "model: {name: mlp, hidden: [32], init: kaiming_normal}")
        got = keys(write_spec, text, change)
        assert got["prune"] != base["prune"] and got["train"] != base["train"], change


def test_training_parameters_rekey_only_the_train_stage(write_spec):
    base = keys(write_spec, TINY_SPEC)
    got = keys(write_spec, TINY_SPEC, "stages.train.epochs=3")
    assert got["prune"] == base["prune"] and got["train"] != base["train"]


def test_parameters_that_change_no_result_do_not_fork_the_key(write_spec):
    base = keys(write_spec, PSG_SPEC)
    # documented as changing no gradient in PaB's setting; checkpoint frequency (resume is exact)
    for change in ("stages.train.quantizer.msb_bits_weight=4", "stages.train.checkpoint_every_steps=3",
                   "stages.train.optimizer.implementation=eager"):
        assert keys(write_spec, PSG_SPEC, change) == base, change
    # while a parameter that does change gradients forks it
    assert keys(write_spec, PSG_SPEC, "stages.train.quantizer.msb_bits=6")["train"] != base["train"]
    # and the schema still documents the left-out parameter
    from pab_framework.schema import spec_schema

    assert "msb_bits_weight" in json.dumps(spec_schema())


# --------------------------------------------------------------------------- the metrics sink
def test_sink_reads_device_tensors_once_and_keeps_plain_numbers():
    sink = MetricsSink(reserved=("val_acc",))
    sink.scalar("flips", torch.tensor(7))
    sink.scalar("rate", torch.tensor(0.25, dtype=torch.float64))
    sink.scalar("lr", 0.1)
    sink.layers({"a.weight": {"kept": torch.tensor(3), "frac": 0.5}}, table="mine")
    sink.layers({"b.weight": {"kept": 4}}, table="mine")
    got = sink.collect()
    assert got.scalars == {"flips": 7, "rate": 0.25, "lr": 0.1}
    assert isinstance(got.scalars["flips"], int)
    assert got.table_rows(3) == {"mine": [{"epoch": 3, "layer": "a.weight", "kept": 3, "frac": 0.5},
                                          {"epoch": 3, "layer": "b.weight", "kept": 4}]}
    assert sink.collect().scalars == {}  # emptied


def test_sink_refuses_a_name_twice_and_bad_names():
    sink = MetricsSink(reserved=("val_acc",))
    sink.scalar("lr", 0.1)
    with pytest.raises(TrainingError, match="recorded twice"):
        sink.scalar("lr", 0.2)
    with pytest.raises(TrainingError, match="recorded twice"):
        sink.scalar("val_acc", 0.2)
    with pytest.raises(ValueError):
        sink.scalar("bad name", 1)
    with pytest.raises(ValueError):
        sink.layers({"x": {"v": 1}}, table="metrics")


def test_sink_turns_a_nonfinite_figure_into_a_missing_one():
    sink = MetricsSink()
    sink.scalar("loss_of_plugin", torch.tensor(float("nan")))
    assert sink.collect().scalars == {"loss_of_plugin": None}


def test_the_progress_line_shows_the_figures_a_plugin_marks_and_no_others(write_spec):
    """`show=True` (or `scalars(..., show=...)`) puts a recorded figure on the epoch's progress
    line; the core names none itself: Bop marks its flips, its other figures stay off the line."""
    import io

    from rich.console import Console

    from pab_framework.pipeline import run_spec
    from pab_framework.progress import Reporter

    sink = MetricsSink()
    sink.scalars({"flips": torch.tensor(7), "flip_rate": 0.5}, show=("flips",))
    sink.scalar("kept", 0.25, show=True)
    sink.scalar("lr", 0.1)
    got = sink.collect()
    assert got.shown == ("flips", "kept") and got.scalars == {"flips": 7, "flip_rate": 0.5, "kept": 0.25, "lr": 0.1}
    assert sink.collect().shown == ()  # emptied with the rest

    buf = io.StringIO()
    run_spec(load_spec(write_spec(TINY_SPEC)), reporter=Reporter(Console(file=buf, width=200), mode="plain"))
    lines = [l for l in buf.getvalue().splitlines() if l.startswith("epoch ")]
    assert len(lines) == 2 and all(re.fullmatch(r"epoch \d/2  loss \d\.\d{4}  val_acc \d\.\d{4}  flips \d+", l) for l in lines), lines


# --------------------------------------------------------------------------- live masks
def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_mask_state_replace_zeroes_newly_pruned_trainable_weights_only():
    net = _net()
    params = dict(net.named_parameters())
    ms = MaskState({"0.weight": torch.ones(5, 6, dtype=torch.bool), "2.weight": torch.ones(3, 5, dtype=torch.bool)}, params)
    w2 = params["2.weight"].detach().clone()
    params["2.weight"].requires_grad_(False)  # frozen: a transform applies its mask in the forward
    new0 = torch.rand(5, 6) > 0.5
    new2 = torch.rand(3, 5) > 0.5
    v = ms.version
    ms.replace({"0.weight": new0, "2.weight": new2})
    assert ms.version == v + 1
    assert torch.all(params["0.weight"][~new0] == 0) and torch.all(params["0.weight"][new0] != 0)
    assert torch.equal(params["2.weight"], w2)  # untouched
    assert ms.kept() == {"0.weight": int(new0.sum()), "2.weight": int(new2.sum())}
    assert ms.density() == (int(new0.sum()) + int(new2.sum()), 45)
    # re-masking after a step follows the new masks, and leaves out what the optimizer keeps itself
    with torch.no_grad():
        params["0.weight"].fill_(1.0)
    ms.remask_(frozenset({"0.weight"}))
    assert torch.all(params["0.weight"] == 1.0)
    ms.remask_(frozenset())
    assert torch.equal(params["0.weight"], new0.float())
    with pytest.raises(ValueError):
        ms.replace({"0.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(KeyError):
        ms.replace({"0.bias": torch.ones(5, dtype=torch.bool)})


# --------------------------------------------------------------------------- the Trainer, reused
FINETUNE = """\
name: ft
seed: 0
model: {name: mlp, hidden: [32], init: kaiming_normal}
data: {name: digits, batch_size: 128}
stages:
  prune:
    kind: prune
    pruner: {name: magnitude, density: 0.5}
  tune:
    kind: finetune_test
    after: [prune]
runtime: {device: cpu, output_dir: runs, progress: none}
"""


class FineTune:
    """A stage kind of its own that trains: a few lines on the Trainer, with its own callback."""

    from pydantic import BaseModel as _B

    class Params(_B):
        pass

    def run(self, ctx) -> dict:
        from pab_framework.callbacks import Callback
        from pab_framework.trainer import Trainer
        from pab_plugins.optimizers.sgd import SGD

        model, masks = ctx.load_model()
        state = MaskState(masks, dict(model.named_parameters()))
        seen = []

        class Count(Callback):
            def record(self, trainer, sink):
                sink.scalar("steps_seen", trainer.steps_per_epoch)
                seen.append(trainer.epoch)

        t = Trainer(ctx, model, state, lambda octx: SGD().build(SGD.Params(lr=0.05), octx), epochs=2, callbacks=[Count()])
        out = t.fit()
        ctx.save_model(model, state.as_dict())
        return {**out, "seen": seen}


def test_a_new_stage_kind_reuses_the_trainer(write_spec, monkeypatch):
    from pab_framework import registry as R
    from pab_framework.pipeline import run_spec

    reg = R.registry()
    reg._load("pab.stages")  # noqa: SLF001 - register a test-only kind beside the installed ones
    entries, broken = reg._loaded["pab.stages"]
    monkeypatch.setitem(entries, "finetune_test", R.Entry("finetune_test", "pab.stages", "tests:FineTune", FineTune()))
    out = {o.stage_id: o for o in run_spec(load_spec(write_spec(FINETUNE)))}
    res = out["tune"].result
    assert res["seen"] == [0, 1] and res["epochs"] == 2 and res["density"] == pytest.approx(0.5, abs=1e-3)
    rows = [json.loads(l) for l in (out["tune"].dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["steps_seen"] for r in rows] == [12, 12] and all("val_acc" in r and "lr" in r for r in rows)
    assert not list(out["tune"].dir.glob("checkpoint*"))  # the checkpoints of the standard callbacks, removed once complete


# --------------------------------------------------------------------------- transforms in order
def test_transforms_compose_in_order(write_spec):
    from pab_framework.transforms import TransformContext, apply_all

    calls = []

    class T:
        def __init__(self, tag):
            self.tag = tag

        def apply(self, model, params, tctx):
            calls.append((self.tag, type(model).__name__))
            return nn.Sequential(model) if self.tag == "wrap" else None  # None: changed in place

    class Call:
        def __init__(self, tag):
            self.plugin, self.params = T(tag), None

    net = _net()
    out = apply_all(net, [Call("first"), Call("wrap"), Call("last")], TransformContext.of(net, ["0.weight"]))
    assert calls == [("first", "Sequential"), ("wrap", "Sequential"), ("last", "Sequential")]
    assert out[0] is net


def test_a_spec_lists_transforms_from_both_groups(write_spec):
    text = TINY_SPEC.replace("    optimizer: {name: bop, ar: 1.0e-3, tau: 1.0e-6}\n",
                             "    optimizer: {name: bop, ar: 1.0e-3, tau: 1.0e-6}\n    transforms: [{name: psg, msb_bits: 6}]\n")
    spec = load_spec(write_spec(text))
    (t,) = spec.stages["train"].params.transforms
    assert t.name == "psg" and t.params.msb_bits == 6
    from pab_framework.errors import SpecError

    with pytest.raises(SpecError, match=r"spec.yaml:14, stages.train.transforms\[0\].name: unknown transform 'pgs'; did you mean 'psg'"):
        load_spec(write_spec(text.replace("name: psg", "name: pgs")))


def test_a_nonfinite_validation_loss_is_a_missing_figure_not_a_crash(write_spec, monkeypatch):
    import pab_framework.trainer as trainer
    from pab_framework.pipeline import run_spec

    real = trainer.evaluate

    def overflowing(*a, **k):
        return {**real(*a, **k), "val_loss": float("inf")}

    monkeypatch.setattr(trainer, "evaluate", overflowing)
    out = {o.stage_id: o for o in run_spec(load_spec(write_spec(TINY_SPEC.replace("progress: plain", "progress: none"))))}
    rows = [json.loads(l) for l in (out["train"].dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in rows] == [None, None] and all(r["val_acc"] > 0 for r in rows)
    assert json.loads((out["train"].dir / "result.json").read_text())["val_loss"] is None


def test_the_nonfinite_watch_costs_one_op_per_step_and_reads_the_device_only_at_its_checks():
    """`on_nonfinite: stop` on an accelerator (checks every few steps): between checks a step
    dispatches one op (its loss copied into the buffer) and waits for nothing; the check names
    the first non-finite step since the last one."""
    from types import SimpleNamespace

    from torch.utils._python_dispatch import TorchDispatchMode

    from pab_framework.callbacks import StopOnNonFinite

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket not in (torch.ops.aten.select, torch.ops.aten.slice, torch.ops.aten.detach):  # views
                self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    trainer = SimpleNamespace(device=torch.device("cpu"), epoch=4, step=0, stage=SimpleNamespace(stage_id="train"), last_saved="ck.pt")
    cb = StopOnNonFinite(every=8)
    cb.setup(trainer, None)
    reads = []
    real = torch.Tensor.__bool__
    losses = [torch.tensor(1.5), torch.tensor(2.5), torch.tensor(float("inf")), torch.tensor(float("nan"))] + [torch.tensor(1.0)] * 3
    try:
        torch.Tensor.__bool__ = lambda t: reads.append(t) or real(t)
        for i, loss in enumerate(losses):
            trainer.step = i
            with Ops() as m:
                assert cb.on_loss(trainer, loss) is True
            assert m.ops == ["aten.copy_"], m.ops
        assert reads == []  # 7 steps, no wait
        with pytest.raises(TrainingError, match=r"not finite \(inf\) at epoch 5, step 3; the last good checkpoint is kept \(ck.pt\)"):
            trainer.step = 7
            cb.on_loss(trainer, torch.tensor(0.5))  # the 8th step: the check
        assert len(reads) == 1
    finally:
        torch.Tensor.__bool__ = real
