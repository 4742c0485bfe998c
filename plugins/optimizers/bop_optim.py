"""The Bop optimizer (Helwegen et al., 2019) as PaB uses it, over one flat vector per group.

Each step: m <- (1 - ar) m + ar g, then w <- -w where sign(m) == sign(w), w != 0 and |m| >= tau.
Magnitudes never change and zero (pruned) weights stay zero. The weights, gradients and moving
averages of a group live in one buffer each (`bop_flat`), so a step is a fixed number of
operations however many tensors the model has: one `torch.compile`d kernel (`"compiled"`), or
plain torch operations (`"eager"`), bitwise alike. docs/bop.md has the details and figures.
"""
from __future__ import annotations

import logging
import operator
from itertools import repeat
from typing import Optional

import torch

from .bop_flat import FlatGroup

log = logging.getLogger(__name__)

COMPILE_MIN_WEIGHTS = 1_000_000  # "auto" compiles the step of groups at least this large

_grad = operator.attrgetter("grad")


def _update(averages, grads, weights, flags, decay, rate, tau, first):
    """One step over flat vectors: averages and weights updated in place, flags[i] = 1 where weight
    i flipped. decay = 1 - ar, rate = ar, tau: 0-dim tensors of the weights' dtype; first: 0-dim
    bool (then m = g + ar g)."""
    m = torch.where(first, grads, averages * decay) + grads * rate
    flip = ((m > 0) & (weights > 0) | (m < 0) & (weights < 0)) & (m.abs() >= tau)
    averages.copy_(m)
    weights.copy_(torch.where(flip, -weights, weights))
    flags.copy_(torch.where(flip, 1, 0))  # (a bool-to-int8 cast vectorises badly in Inductor's C++)


_compiled_update = None


def _compiled():
    global _compiled_update
    if _compiled_update is None:
        _compiled_update = torch.compile(_update, dynamic=True, options={"emulate_precision_casts": True})
    return _compiled_update


def _update_eager(flat: FlatGroup, ar: float, tau: float, first: bool) -> None:
    """`_update` with eager torch operations, CHUNK weights at a time (16 operations each) into
    preallocated scratch."""
    for avg, grad, weight, flip, scratch, cond, cond2 in flat.chunks():
        torch.mul(grad, ar, out=scratch)  # ar * g rounded on its own (an alpha= add could fuse into an FMA)
        if first:
            avg.copy_(grad)
        else:
            avg.mul_(1.0 - ar)
        avg.add_(scratch)
        torch.gt(avg, 0, out=flip)
        torch.gt(weight, 0, out=cond)
        flip.logical_and_(cond)
        torch.lt(avg, 0, out=cond)
        torch.lt(weight, 0, out=cond2)
        cond.logical_and_(cond2)
        flip.logical_or_(cond)
        torch.abs(avg, out=scratch)
        torch.ge(scratch, tau, out=cond)
        flip.logical_and_(cond)
        torch.mul(flip, -2.0, out=scratch)  # -1 where flipped, 1 elsewhere: w * scratch is exact
        scratch.add_(1.0)
        weight.mul_(scratch)


def _step_tensors(averages, grads, weights, counts, ar: float, tau: float, firsts) -> None:
    """The same step one tensor at a time (groups that cannot be flat, steps where some tensors have
    no gradient, the first step of a part of a group). Bit-exact with the flat paths."""
    sums = []
    for avg, grad, weight, first in zip(averages, grads, weights, firsts):
        if first:
            avg.copy_(grad)
        else:
            avg.mul_(1.0 - ar)
        avg.add_(grad * ar)
        flip = ((avg > 0) & (weight > 0) | (avg < 0) & (weight < 0)) & (avg.abs() >= tau)
        torch.where(flip, -weight, weight, out=weight)
        sums.append(flip.sum())
    if sums:
        torch._foreach_add_(counts, sums)


class Bop(torch.optim.Optimizer):
    """Bop over the given parameters (all of them sign-trained).

    `init_average`: `"zero"` starts m at 0 (the Bop paper); `"first_grad"` makes the first step
    m = g + ar g (the original PaB code). `implementation`: `"compiled"`, `"eager"`, or `"auto"`
    (compiled for groups of COMPILE_MIN_WEIGHTS weights or more where Inductor works).
    `flip_counts()` returns one int64 tensor per parameter (flips since the last
    `reset_flip_counts()`), still on the device; `set_ar` / `set_tau` change the schedule.
    `last_implementation` says which step ran last: `compiled`, `eager` or `per-tensor`.
    """

    def __init__(self, params, ar: float = 1e-3, tau: float = 1e-6, init_average: str = "zero",
                 implementation: str = "auto"):
        if not 0 < ar < 1:
            raise ValueError(f"ar must be in (0, 1), got {ar}")
        if tau < 0:
            raise ValueError(f"tau must be >= 0, got {tau}")
        if init_average not in ("zero", "first_grad"):
            raise ValueError(f"init_average must be 'zero' or 'first_grad', got {init_average!r}")
        if implementation not in ("auto", "eager", "compiled"):
            raise ValueError(f"implementation must be auto, eager or compiled, got {implementation!r}")
        super().__init__(params, dict(ar=ar, tau=tau))
        self.init_average = init_average
        self.implementation = implementation
        self.last_implementation: Optional[str] = None
        self._flats: dict[int, Optional[FlatGroup]] = {}
        self._compile_failed = False
        for p in self._params():
            self.state[p]["flips"] = torch.zeros((), dtype=torch.int64, device=p.device)

    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def _use_compiled(self, numel: int) -> bool:
        if self.implementation == "eager" or self._compile_failed:
            return False
        if self.implementation == "compiled":
            return True
        return numel >= COMPILE_MIN_WEIGHTS

    def _flat(self, i: int, params: list) -> tuple[Optional[FlatGroup], bool]:
        """The group's flat layout (built or rebuilt when needed; None for a group mixing devices or
        dtypes) and whether it was built just now."""
        flat = self._flats.get(i)
        if flat is not None and flat.matches(params):
            return flat, False
        p0 = params[0]
        if not (p0.is_floating_point() and all(p.device == p0.device and p.dtype == p0.dtype and p.layout == torch.strided
                                                 for p in params)):
            self._flats[i] = None
            return None, False
        if any(p.grad is not None and p.grad.is_sparse for p in params):
            raise RuntimeError("Bop does not support sparse gradients")
        flat = FlatGroup(params, self.state)
        flat.group_list = params
        self._flats[i] = flat
        return flat, True

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):
            params = group["params"]
            if params and any(map(operator.is_not, map(_grad, params), repeat(None))):
                self._step_group(i, params, group["ar"], group["tau"])
        return loss

    def _step_group(self, i: int, params: list, ar: float, tau: float) -> None:
        flat, _ = self._flat(i, params)
        if flat is None:
            self._step_unflattened(params, ar, tau)
            return
        grads = list(map(_grad, params))
        missing = False
        if not all(map(operator.is_, grads, flat.grad_views)):  # new gradient tensors, or none for some
            grads = self._adopt_grads(flat, grads)
            missing = any(map(operator.is_, grads, repeat(None)))
        first_grad = self.init_average == "first_grad"
        if missing or (first_grad and 0 < flat.n_fresh < flat.n_tensors):
            self._step_some(flat, grads, ar, tau)
            return
        if flat.numel:
            self._step_flat(flat, ar, tau, first_grad and flat.n_fresh == flat.n_tensors)
            flat.count()
        if flat.n_fresh:
            for k, p in enumerate(params):
                self.state[p]["moving_average"] = flat.average_views[k]
            flat.fresh = [False] * flat.n_tensors
            flat.n_fresh = 0

    def _step_flat(self, flat: FlatGroup, ar: float, tau: float, first: bool) -> None:
        """The update of the whole flat group: compiled where it may be, else eager."""
        if self._use_compiled(flat.numel):
            try:
                _compiled()(flat.averages, flat.grads, flat.weights, flat.flags, *flat.set_coefficients(ar, tau, first))
                self.last_implementation = "compiled"
                return
            except Exception as e:  # Inductor unavailable here: the eager step computes the same thing
                if self.implementation == "compiled":
                    raise
                log.warning("Bop: torch.compile failed (%s: %s); using the eager step", type(e).__name__, str(e).splitlines()[0][:200])
                self._compile_failed = True
        _update_eager(flat, ar, tau, first)
        self.last_implementation = "eager"

    def _adopt_grads(self, flat: FlatGroup, grads: list) -> list:
        """Gradients autograd (or anyone) put in place of the views of the flat gradients: copied
        in (one multi-tensor copy), and the views put back."""
        idx = [k for k, (g, v) in enumerate(zip(grads, flat.grad_views)) if g is not None and g is not v]
        if any(grads[k].is_sparse for k in idx):
            raise RuntimeError("Bop does not support sparse gradients")
        if idx:
            torch._foreach_copy_([flat.grad_views[k] for k in idx], [grads[k] for k in idx])
        for k in idx:
            flat.params[k].grad = flat.grad_views[k]
        return [None if g is None else v for g, v in zip(grads, flat.grad_views)]

    def _step_some(self, flat: FlatGroup, grads: list, ar: float, tau: float) -> None:
        """Per tensor on the flat views: the tensors without a gradient are skipped."""
        idx = [k for k, g in enumerate(grads) if g is not None]
        firsts = [self.init_average == "first_grad" and flat.fresh[k] for k in idx]
        _step_tensors([flat.average_views[k] for k in idx], [flat.grad_views[k] for k in idx],
                      [flat.weight_views[k] for k in idx], [flat.count_views[k] for k in idx], ar, tau, firsts)
        for k in idx:
            if flat.fresh[k]:
                self.state[flat.params[k]]["moving_average"] = flat.average_views[k]
                flat.fresh[k] = False
                flat.n_fresh -= 1
        self.last_implementation = "per-tensor"

    def _step_unflattened(self, params: list, ar: float, tau: float) -> None:
        """A group mixing devices or dtypes: per tensor, on state tensors of its own."""
        averages, grads, weights, counts, firsts = [], [], [], [], []
        for p in params:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Bop does not support sparse gradients")
            state = self.state[p]
            fresh = "moving_average" not in state
            if fresh:
                state["moving_average"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            averages.append(state["moving_average"])
            grads.append(p.grad)
            weights.append(p)
            counts.append(state["flips"])
            firsts.append(fresh and self.init_average == "first_grad")
        _step_tensors(averages, grads, weights, counts, ar, tau, firsts)
        self.last_implementation = "per-tensor"

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's; with `set_to_none=False` the flat groups' gradients are zeroed in one
        operation each and stay views of the flat buffer (autograd then accumulates into them)."""
        if set_to_none:
            super().zero_grad(set_to_none=True)
            return
        rest = []
        for i, group in enumerate(self.param_groups):
            flat = self._flats.get(i)
            if flat is not None and flat.matches(group["params"]):
                flat.grads.zero_()
                grads = list(map(_grad, group["params"]))
                if not all(map(operator.is_, grads, flat.grad_views)):
                    rest.extend(p for p, g, v in zip(group["params"], grads, flat.grad_views) if g is not None and g is not v)
            else:
                rest.extend(p for p in group["params"] if p.grad is not None)
        for p in rest:
            if p.grad.grad_fn is not None:
                p.grad.detach_()
            else:
                p.grad.requires_grad_(False)
        if rest:
            torch._foreach_zero_([p.grad for p in rest])

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the int64 flip counters stay int64 (torch casts every other state
        tensor to its parameter's dtype, which would round counts above 2^24). The flat layout is
        rebuilt from the loaded state at the next step."""
        state = {k: dict(v) for k, v in state_dict["state"].items()}
        counters = {k: v.pop("flips") for k, v in state.items() if "flips" in v}
        super().load_state_dict({**state_dict, "state": state})
        self._flats.clear()
        for i, p in enumerate(self._params()):
            if i in counters:
                self.state[p]["flips"] = counters[i].to(device=p.device, dtype=torch.int64)
            else:
                self.state[p].setdefault("flips", torch.zeros((), dtype=torch.int64, device=p.device))

    def flip_counts(self) -> list[torch.Tensor]:
        return [self.state[p]["flips"] for p in self._params()]

    def reset_flip_counts(self) -> None:
        counts = self.flip_counts()
        if counts:
            torch._foreach_zero_(counts)

    def set_ar(self, ar: float) -> None:
        for g in self.param_groups:
            g["ar"] = ar

    def set_tau(self, tau: float) -> None:
        for g in self.param_groups:
            g["tau"] = tau

    def extra_memory_bytes(self) -> int:
        """Bytes of optimizer state: the moving averages and the per-tensor counters."""
        seen, n = set(), 0
        for st in self.state.values():
            for t in st.values():
                if torch.is_tensor(t):
                    # views of one buffer (the flat layout): the buffer counts once, whole
                    s = t.untyped_storage()
                    if s.data_ptr() not in seen:
                        seen.add(s.data_ptr())
                        n += s.nbytes()
        return n

    def scratch_bytes(self) -> int:
        """Bytes of working memory besides the state: the flip flags (one byte per weight), the
        counting tables, and the eager step's chunk buffers once used."""
        return sum(flat.nbytes_scratch() for flat in self._flats.values() if flat is not None)
