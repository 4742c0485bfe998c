"""The Bop optimizer (Helwegen et al., 2019) as PaB uses it, over one flat vector per group.

State per weight: a moving average m of its gradient. Each step:

    m <- (1 - ar) * m + ar * g          (each product rounded on its own, then the sum)
    w <- -w   where sign(m) == sign(w), w != 0 and |m| >= tau

Magnitudes never change and zero (pruned) weights stay zero. The flip test compares signs, so no
product m * w can underflow (w = 1e-30 with m = 1e-23 flips like any other pair). With
`init_average="first_grad"` the first step sets m = g + ar * g instead, as the original PaB code
does; `"zero"` starts from m = 0 as in the Bop paper. With tau = 0, a zero weight whose m is 0 is
not counted as a flip (the original code counts it, although the weight stays 0).

Layout. On its first step Bop moves the weights of a param group into one buffer W and keeps their
gradients in one buffer G and their moving averages in one buffer M: each parameter's `.data`,
`.grad` and `state["moving_average"]` are views of those, with the parameter's own strides (a
channels_last convolution stays channels_last). A step is then a fixed number of operations over
one vector, however many tensors the model has. The per-tensor flip counters are the elements of
one int64 vector (`state[p]["flips"]` are views of it) and stay on the device until read.

- `zero_grad(set_to_none=False)` (what `BopHybrid` calls) zeroes G in one operation and keeps the
  views, so autograd accumulates the next gradients into G (DDP copies its averaged gradients into
  `p.grad` in place, so it does too). After `set_to_none=True` autograd hands over new tensors: the
  next step copies them into G in one multi-tensor copy and puts the views back. A parameter with
  no gradient makes that step go tensor by tensor for its group, skipping that parameter.
- Every step checks in Python that each parameter still lives where the layout put it (after
  `model.to(...)`, `p.data = ...`, a memory-format change, `load_state_dict`) and otherwise lays
  the group out again from the parameters' and the state's current values.

The step. `implementation="compiled"` runs the update as one `torch.compile`d function of the flat
vectors. Inductor makes it one kernel that reads w, g, m and writes m, w and a one-byte flip flag
per weight: 5.25 times the weights' bytes, where the `_foreach_add_` floor moves 3 times and any
Bop step at least 5. It contracts no product and sum into an FMA (`emulate_precision_casts` turns
Triton's fp fusion off; Inductor's C++ is built with -ffp-contract=off), so it is bit-exact with the
eager step and the written-out formulas. Shapes are dynamic: one compilation per process serves
every model (about 30 s on a 2-core CPU with an empty Inductor cache, about 5 s from its disk
cache). The flags become per-tensor counts in ten small operations, whatever the number of
tensors: rows of 512 flags are summed as 64 int64 words (each byte lane then counts at most 64
flags, so no lane carries into the next) and then as 8 bytes, and each tensor boundary's partial
row is summed from a masked gather. `implementation="eager"` computes the same with plain torch
operations, 16 per `CHUNK` weights (bounded scratch), and the same ten counting operations.
`"auto"` is compiled for groups of at least `COMPILE_MIN_WEIGHTS` weights where Inductor works,
eager otherwise.

Why this shape, measured on the CPU and reasoned for the GPU (ResNet-50's 161 tensors, 25.6 M
weights; the old step launched about 8 kernels per tensor). `_foreach` ops launch once per chunk of
tensors but each is a full pass over memory, and there is no `_foreach` comparison or `where`: the
eager step is about 15 passes, 5x the floor or more, however few its launches; CUDA graphs would
remove launches, not passes. Only a fused kernel gets near the floor, and one kernel over one flat
vector needs no per-tensor code, so it compiles in seconds where a per-tensor compiled step took a
minute. On a GPU a step is then one fused kernel, about 10 tiny counting kernels and the Python
checks (tens of microseconds), against about 0.45 ms allowed on an H200. Memory: the moving averages
(one per weight), one int64 counter per tensor, one byte per weight of flags, small tables, and in
eager mode 6 bytes per weight of a chunk.
"""
from __future__ import annotations

import logging
import operator
from itertools import repeat
from typing import Optional

import torch

log = logging.getLogger(__name__)

COMPILE_MIN_WEIGHTS = 1_000_000
ROW = 512  # flags per counting row: 64 int64 words, each byte lane of their sum stays <= 64
CHUNK = 1 << 22  # the eager step's elements per pass (its scratch: 6 bytes per element)

_grad = operator.attrgetter("grad")


def _update(M, G, W, F, c1, c2, tau, first):
    """One step over flat vectors: M, W updated in place, F[i] = 1 where weight i flipped.
    c1 = 1 - ar, c2 = ar, tau: 0-dim tensors of W's dtype; first: 0-dim bool (m = g + ar g)."""
    m = torch.where(first, G, M * c1) + G * c2
    flip = ((m > 0) & (W > 0) | (m < 0) & (W < 0)) & (m.abs() >= tau)
    M.copy_(m)
    W.copy_(torch.where(flip, -W, W))
    F.copy_(torch.where(flip, 1, 0))  # (a bool-to-int8 cast vectorises badly in Inductor's C++)


_compiled_update = None


def _compiled():
    global _compiled_update
    if _compiled_update is None:
        _compiled_update = torch.compile(_update, dynamic=True, options={"emulate_precision_casts": True})
    return _compiled_update


def _update_eager(fl: "_Flat", ar: float, tau: float, first: bool) -> None:
    """`_update` with eager torch operations, CHUNK weights at a time (16 operations each) into
    preallocated scratch."""
    for m, g, w, f, s, t, u in fl.chunks():
        torch.mul(g, ar, out=s)  # ar * g rounded on its own (an alpha= add could fuse into an FMA)
        if first:
            m.copy_(g)
        else:
            m.mul_(1.0 - ar)
        m.add_(s)
        torch.gt(m, 0, out=f)
        torch.gt(w, 0, out=t)
        f.logical_and_(t)
        torch.lt(m, 0, out=t)
        torch.lt(w, 0, out=u)
        t.logical_and_(u)
        f.logical_or_(t)
        torch.abs(m, out=s)
        torch.ge(s, tau, out=t)
        f.logical_and_(t)
        torch.mul(f, -2.0, out=s)  # -1 where flipped, 1 elsewhere: w * s is exact
        s.add_(1.0)
        w.mul_(s)


class _Counter:
    """Per-tensor counts of the flags set in F (int8 0/1, one per weight of the flat vector, zero
    past the last one), with ten operations whatever the number of tensors. Rows of ROW flags are
    summed as ROW/8 int64 words (each byte lane of the sum counts at most ROW/8 flags, so no lane
    carries into the next) and then as 8 bytes; tensor t spans [b_t, b_t+1) of the flat vector, and
    the flags in [0, b) are the rows before b's row plus the part of b's row before b (a gather of
    T+1 rows, masked). Every buffer is allocated once."""

    def __init__(self, offsets: list[int], device: torch.device):
        n = offsets[-1]
        rows = n // ROW + 1
        i64 = dict(device=device, dtype=torch.int64)
        self.F = torch.zeros(rows * ROW, device=device, dtype=torch.int8)
        self.Fn = self.F[:n]
        self.F64 = self.F.view(torch.int64).view(rows, ROW // 8)
        self.F2d = self.F.view(rows, ROW)
        self.words = torch.empty(rows, **i64)
        self.words8 = self.words.view(torch.uint8).view(rows, 8)
        self.per_row = torch.empty(rows, **i64)
        self.before = torch.empty(rows, **i64)
        b = torch.tensor(offsets, dtype=torch.int64)
        brow = b // ROW
        self.brow = brow.to(device)
        self.cutmask = (torch.arange(ROW)[None, :] < (b - brow * ROW)[:, None]).to(device=device, dtype=torch.int8)
        self.gath = torch.empty_like(self.cutmask)
        self.at = torch.empty(len(offsets), **i64)
        self.tmp = torch.empty(len(offsets), **i64)
        self.hi, self.lo = self.at[1:], self.at[:-1]

    def add_to(self, counts: torch.Tensor) -> None:
        torch.sum(self.F64, 1, out=self.words)
        torch.sum(self.words8, 1, out=self.per_row)
        torch.cumsum(self.per_row, 0, out=self.before)
        self.before.sub_(self.per_row)  # flags in the rows before each row
        torch.index_select(self.F2d, 0, self.brow, out=self.gath)
        self.gath.mul_(self.cutmask)
        torch.sum(self.gath, 1, out=self.at)
        torch.index_select(self.before, 0, self.brow, out=self.tmp)
        self.at.add_(self.tmp)  # flags in [0, b) for each boundary b
        counts.add_(self.hi).sub_(self.lo)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.F, self.words, self.per_row, self.before, self.brow,
                                                         self.cutmask, self.gath, self.at, self.tmp))


def _step_tensors(ms, gs, ws, counts, ar: float, tau: float, firsts) -> None:
    """The same step one tensor at a time (groups that cannot be flat, steps where some tensors have
    no gradient, the first step of a part of a group). Bit-exact with the flat paths."""
    sums = []
    for m, g, w, first in zip(ms, gs, ws, firsts):
        if first:
            m.copy_(g)
        else:
            m.mul_(1.0 - ar)
        m.add_(g * ar)
        f = ((m > 0) & (w > 0) | (m < 0) & (w < 0)) & (m.abs() >= tau)
        torch.where(f, -w, w, out=w)
        sums.append(f.sum())
    if sums:
        torch._foreach_add_(counts, sums)


def _dense_strides(p: torch.Tensor) -> tuple[int, ...]:
    """p's strides if its elements fill numel() consecutive slots (contiguous, channels_last, any
    permutation), else the contiguous strides of its shape."""
    acc = 1
    for st, n in sorted((st, n) for n, st in zip(p.shape, p.stride()) if n != 1):
        if st != acc:
            break
        acc *= n
    else:
        if p.numel() > 0:
            return tuple(p.stride())
    strides, acc = [], 1
    for n in reversed(p.shape):
        strides.append(acc)
        acc *= max(1, n)
    return tuple(reversed(strides))


class _Flat:
    """The weights, gradients and moving averages of one param group as views of one buffer each."""

    def __init__(self, params: list, state: dict):
        p0 = params[0]
        dev, dt = p0.device, p0.dtype
        self.params = params
        self.group_list = None
        self.T = len(params)
        numels = [p.numel() for p in params]
        offsets = [0]
        for n in numels:
            offsets.append(offsets[-1] + n)
        self.numel = n_all = offsets[-1]
        geo = [(tuple(p.shape), _dense_strides(p), o) for p, o in zip(params, offsets)]
        self.W = torch.empty(n_all, device=dev, dtype=dt)
        self.G = torch.zeros(n_all, device=dev, dtype=dt)
        self.M = torch.zeros(n_all, device=dev, dtype=dt)
        self.wv = [self.W.as_strided(s, st, o) for s, st, o in geo]
        self.gv = [self.G.as_strided(s, st, o) for s, st, o in geo]
        self.mv = [self.M.as_strided(s, st, o) for s, st, o in geo]
        torch._foreach_copy_(self.wv, [p.detach() for p in params])
        old = [(i, state[p]["moving_average"]) for i, p in enumerate(params) if "moving_average" in state[p]]
        if old:
            torch._foreach_copy_([self.mv[i] for i, _ in old], [m.to(dev, dt) for _, m in old])
        with_grad = [(i, p.grad) for i, p in enumerate(params) if p.grad is not None]
        if with_grad:
            torch._foreach_copy_([self.gv[i] for i, _ in with_grad], [g for _, g in with_grad])
        for i, p in enumerate(params):
            p.data = self.wv[i]
        for i, _ in with_grad:
            params[i].grad = self.gv[i]
        flips = [state[p].get("flips") for p in params]
        self.counts = torch.stack([torch.zeros((), dtype=torch.int64, device=dev) if c is None else c.to(dev, torch.int64).reshape(())
                                   for c in flips])
        self.cv = list(self.counts.unbind(0))
        self.fresh = ["moving_average" not in state[p] for p in params]
        self.n_fresh = sum(self.fresh)
        for i, p in enumerate(params):
            state[p]["flips"] = self.cv[i]
            if not self.fresh[i]:
                state[p]["moving_average"] = self.mv[i]
        self.counter = _Counter(offsets, dev)
        self.Fn = self.counter.Fn
        self.ptrs = [p.data_ptr() for p in params]
        self._scratch = self._chunks = None
        self.coef = None  # (c1, c2, tau, first) on the device, for the compiled step
        self.coef_vals = None

    def matches(self, params: list) -> bool:
        """The group still holds these parameters and they still live in W."""
        return (params is self.group_list and len(params) == self.T
                and list(map(torch.Tensor.data_ptr, params)) == self.ptrs)

    def chunks(self) -> list:
        """The eager step's views, CHUNK weights each: (m, g, w, flags, float scratch, 2 bool scratch)."""
        if self._chunks is None:
            k = min(CHUNK, max(1, self.numel))
            dev = self.W.device
            self._scratch = (torch.empty(k, device=dev, dtype=self.W.dtype), torch.empty(k, device=dev, dtype=torch.bool),
                             torch.empty(k, device=dev, dtype=torch.bool))
            flags = self.Fn.view(torch.bool)
            self._chunks = []
            for lo in range(0, self.numel, CHUNK):
                hi = min(self.numel, lo + CHUNK)
                self._chunks.append((self.M[lo:hi], self.G[lo:hi], self.W[lo:hi], flags[lo:hi], *(t[: hi - lo] for t in self._scratch)))
        return self._chunks

    def set_coefficients(self, ar: float, tau: float, first: bool) -> tuple:
        """The device scalars of the compiled step, refilled in place when a value changes (a fill is
        a kernel launch with the value as its argument: no host-to-device copy, no synchronisation)."""
        vals = (ar, tau, first)
        if self.coef is None:
            dev, dt = self.W.device, self.W.dtype
            self.coef = (torch.empty((), device=dev, dtype=dt), torch.empty((), device=dev, dtype=dt),
                         torch.empty((), device=dev, dtype=dt), torch.empty((), device=dev, dtype=torch.bool))
        if vals != self.coef_vals:
            old = self.coef_vals or (None, None, None)
            c1, c2, t, f = self.coef
            if ar != old[0]:
                c1.fill_(1.0 - ar)
                c2.fill_(ar)
            if tau != old[1]:
                t.fill_(tau)
            if first != old[2]:
                f.fill_(first)
            self.coef_vals = vals
        return self.coef

    def count(self) -> None:
        self.counter.add_to(self.counts)

    def nbytes_scratch(self) -> int:
        n = self.counter.nbytes()
        if self._scratch is not None:
            n += sum(t.numel() * t.element_size() for t in self._scratch)
        return n


class Bop(torch.optim.Optimizer):
    """Bop over the given parameters (all of them sign-trained).

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
        self._flats: dict[int, Optional[_Flat]] = {}
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

    def _flat(self, i: int, params: list) -> tuple[Optional[_Flat], bool]:
        """The group's flat layout (built or rebuilt when needed; None for a group mixing devices or
        dtypes) and whether it was built just now."""
        fl = self._flats.get(i)
        if fl is not None and fl.matches(params):
            return fl, False
        p0 = params[0]
        if not (p0.is_floating_point() and all(p.device == p0.device and p.dtype == p0.dtype and p.layout == torch.strided
                                                 for p in params)):
            self._flats[i] = None
            return None, False
        if any(p.grad is not None and p.grad.is_sparse for p in params):
            raise RuntimeError("Bop does not support sparse gradients")
        fl = _Flat(params, self.state)
        fl.group_list = params
        self._flats[i] = fl
        return fl, True

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):
            params = group["params"]
            if not params:
                continue
            ar, tau = group["ar"], group["tau"]
            grads = list(map(_grad, params))
            if not any(map(operator.is_not, grads, repeat(None))):
                continue
            fl, built = self._flat(i, params)
            if fl is None:
                self._step_unflattened(params, ar, tau)
                continue
            if built:
                grads = list(map(_grad, params))
            missing = False
            if not all(map(operator.is_, grads, fl.gv)):  # new gradient tensors, or none for some
                grads = self._adopt_grads(fl, grads)
                missing = any(map(operator.is_, grads, repeat(None)))
            first_grad = self.init_average == "first_grad"
            if missing or (first_grad and 0 < fl.n_fresh < fl.T):
                self._step_some(fl, grads, ar, tau)
                continue
            first = first_grad and fl.n_fresh == fl.T
            if not fl.numel:
                pass
            elif self._use_compiled(fl.numel):
                try:
                    _compiled()(fl.M, fl.G, fl.W, fl.Fn, *fl.set_coefficients(ar, tau, first))
                    self.last_implementation = "compiled"
                except Exception as e:  # Inductor unavailable here: the eager step computes the same thing
                    if self.implementation == "compiled":
                        raise
                    log.warning("Bop: torch.compile failed (%s: %s); using the eager step", type(e).__name__, str(e).splitlines()[0][:200])
                    self._compile_failed = True
                    _update_eager(fl, ar, tau, first)
                    self.last_implementation = "eager"
            else:
                _update_eager(fl, ar, tau, first)
                self.last_implementation = "eager"
            if fl.numel:
                fl.count()
            if fl.n_fresh:
                for k, p in enumerate(params):
                    self.state[p]["moving_average"] = fl.mv[k]
                fl.fresh = [False] * fl.T
                fl.n_fresh = 0
        return loss

    def _adopt_grads(self, fl: _Flat, grads: list) -> list:
        """Gradients autograd (or anyone) put in place of the views of G: copied into G (one
        multi-tensor copy), and the views put back."""
        idx = [k for k, (g, v) in enumerate(zip(grads, fl.gv)) if g is not None and g is not v]
        if any(grads[k].is_sparse for k in idx):
            raise RuntimeError("Bop does not support sparse gradients")
        if idx:
            torch._foreach_copy_([fl.gv[k] for k in idx], [grads[k] for k in idx])
        for k in idx:
            fl.params[k].grad = fl.gv[k]
        return [None if g is None else v for g, v in zip(grads, fl.gv)]

    def _step_some(self, fl: _Flat, grads: list, ar: float, tau: float) -> None:
        """Per tensor on the flat views: the tensors without a gradient are skipped."""
        idx = [k for k, g in enumerate(grads) if g is not None]
        firsts = [self.init_average == "first_grad" and fl.fresh[k] for k in idx]
        _step_tensors([fl.mv[k] for k in idx], [fl.gv[k] for k in idx], [fl.wv[k] for k in idx], [fl.cv[k] for k in idx], ar, tau, firsts)
        for k in idx:
            if fl.fresh[k]:
                self.state[fl.params[k]]["moving_average"] = fl.mv[k]
                fl.fresh[k] = False
                fl.n_fresh -= 1
        self.last_implementation = "per-tensor"

    def _step_unflattened(self, params: list, ar: float, tau: float) -> None:
        """A group mixing devices or dtypes: per tensor, on state tensors of its own."""
        ms, gs, ws, cs, firsts = [], [], [], [], []
        for p in params:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Bop does not support sparse gradients")
            st = self.state[p]
            fresh = "moving_average" not in st
            if fresh:
                st["moving_average"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            ms.append(st["moving_average"])
            gs.append(p.grad)
            ws.append(p)
            cs.append(st["flips"])
            firsts.append(fresh and self.init_average == "first_grad")
        _step_tensors(ms, gs, ws, cs, ar, tau, firsts)
        self.last_implementation = "per-tensor"

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's; with `set_to_none=False` the flat groups' gradients are zeroed in one
        operation each and stay views of G (autograd then accumulates into them)."""
        if set_to_none:
            super().zero_grad(set_to_none=True)
            return
        rest = []
        for i, group in enumerate(self.param_groups):
            fl = self._flats.get(i)
            if fl is not None and fl.matches(group["params"]):
                fl.G.zero_()
                grads = list(map(_grad, group["params"]))
                if not all(map(operator.is_, grads, fl.gv)):
                    rest.extend(p for p, g, v in zip(group["params"], grads, fl.gv) if g is not None and g is not v)
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
        return sum(fl.nbytes_scratch() for fl in self._flats.values() if fl is not None)
