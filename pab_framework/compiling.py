"""`runtime.compile`: the model a train stage trains, compiled in place with torch.compile.

`in_place(stage, model)` replaces the `forward` of this one model instance with a compiled one.
The module stays the module: its state_dict keys (no `_orig_mod.`), its hooks, and whatever holds
it (DDP, callbacks, checkpoints, model.pt) see the eager model. The Trainer does it after the
stage's quantizer and transforms and before DDP wraps the model; a compile that happens inside
DDP's forward gets dynamo's DDPOptimizer (graphs split at the gradient buckets, so the all-reduce
overlaps the backward). The evaluation at each epoch's end calls the same model: it is compiled
too, as a graph of its own (evaluation mode, no gradients). When training ends the model is eager
again.

Nothing recompiles after the first epoch:
- the inputs' batch dimension is marked dynamic (`dynamic: null`): the epoch's smaller last batch
  and the evaluation batches reuse the graph (on the CPU a convolution also guards on the batch
  being under 16: one more graph, met within the first epoch);
- masks, Bop's sign flips and the schedules change tensors in place or outside the model;
- the compiled function has a code object of its own: dynamo keeps graphs and counts recompiles
  per code object, so models compiled one after another in one process (the stages of a spec,
  the runs of a grid worker) neither share a cache nor use up its recompile limit, and a model's
  graphs go with it;
- with CUDA graphs (`reduce-overhead`, `max-autotune` on CUDA) every call starts a new step of
  the graph trees (`torch.compiler.cudagraph_mark_step_begin`): a step is done with its outputs
  before the next forward.
"""
from __future__ import annotations

import time
import types
from typing import Callable

import torch
import torch.nn as nn

from .callbacks import Callback
from .errors import Problem

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def problems(spec, device: torch.device) -> list[Problem]:
    """What runtime.compile asks that `device` cannot do, placed where the setting is written."""
    opts = spec.runtime.compile_options()
    if opts is None:
        return []
    out = []
    if opts.mode == "reduce-overhead" and device.type != "cuda":
        out.append(spec.problem(("runtime", "compile"), "reduce-overhead captures CUDA graphs, which need a CUDA device; "
                                f"this run computes on the {device.type.upper()}: use runtime.compile: default"))
    if opts.backend == "inductor" and device.type == "cpu" and not _cpp_compiler():
        out.append(spec.problem(("runtime", "compile"), "Inductor compiles for the CPU with a C++ compiler, and none is found "
                                "(g++ or clang++ on PATH, or $CXX): install one, or use runtime.compile: none"))
    return out


def _cpp_compiler() -> str | None:
    """The C++ compiler Inductor would use on the CPU, or None."""
    from torch._inductor import cpp_builder  # heavy (Inductor), and only needed when compiling

    try:
        return cpp_builder.get_cpp_compiler()
    except Exception:  # Inductor's own "no C++ compiler" error
        return None


def in_place(stage, model: nn.Module) -> list[Callback]:
    """`model` compiled in place as the run's runtime.compile asks (module docstring), with the
    callback that reports and times the first compile and makes the model eager again when
    training ends; [] when the model runs eager."""
    opts = stage.spec.runtime.compile_options()
    if opts is None:
        return []
    undo = compile_forward(model, opts, stage.device)
    return [CompileReport(undo, f"mode {opts.mode}" if opts.backend == "inductor" else f"backend {opts.backend}")]


def compile_forward(model: nn.Module, opts, device: torch.device) -> Callable[[], None]:
    """Replace `model.forward` with a compiled one (`opts`: a CompileSpec); returns what undoes it."""
    eager = model.forward  # the class's forward, bound to this model

    def call(*args, **kwargs):
        return eager(*args, **kwargs)

    kw = {"mode": opts.mode} if opts.backend == "inductor" else {}
    compiled = torch.compile(_own_code(call), fullgraph=opts.fullgraph, dynamic=opts.dynamic, backend=opts.backend, **kw)
    batch_dynamic = opts.dynamic is None
    new_step = device.type == "cuda" and opts.backend == "inductor" and opts.mode in CUDA_GRAPH_MODES

    def forward(*args, **kwargs):
        if batch_dynamic:
            for a in args:
                if isinstance(a, torch.Tensor) and a.dim():
                    torch._dynamo.maybe_mark_dynamic(a, 0)
        if new_step:
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    model.forward = forward  # an attribute of this instance: the class's forward is untouched
    return lambda: model.__dict__.pop("forward", None)


def _own_code(fn):
    """`fn` with a copy of its code object: the compiled graphs of this function are its own."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class CompileReport(Callback):
    """Says when the model compiles (its first step, its first evaluation), measures the first
    step (result.json's `compile_s`: the compile, and one step), and undoes the compile at the end."""

    def __init__(self, undo: Callable[[], None], how: str):
        self.undo, self.how = undo, how
        self.t0: float | None = None
        self.compile_s: float | None = None
        self.eval_said = False

    def setup(self, trainer, stack) -> None:
        stack.callback(self.undo)

    def before_forward(self, trainer) -> None:
        if self.t0 is None:
            trainer.stage.log(f"compiling the model ({self.how}; the first step)...")
            self.t0 = time.perf_counter()

    def on_step_end(self, trainer) -> None:
        if self.compile_s is None and self.t0 is not None:
            self.compile_s = time.perf_counter() - self.t0
            trainer.stage.log(f"compiled the training step in {self.compile_s:.1f} s")

    def on_train_epoch_end(self, trainer) -> None:
        if not self.eval_said:
            self.eval_said = True
            trainer.stage.log("compiling the evaluation pass (the first epoch's end)...")

    def on_fit_end(self, trainer) -> dict:
        return {} if self.compile_s is None else {"compile_s": round(self.compile_s, 3)}
