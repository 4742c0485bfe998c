"""The Bop optimizer (Helwegen et al., 2019) as PaB uses it, vectorised over all its tensors.

State per weight: a moving average m of its gradient. Each step:

    m <- (1 - ar) * m + ar * g
    w <- -w   where |m| >= tau and sign(m) == sign(w)      (w != 0)

Magnitudes never change and zero (pruned) weights stay zero. With `init_average="first_grad"` the
first step sets m = g + ar * g instead, as the original PaB code does; `"zero"` starts from m = 0
as in the Bop paper.

The step is written for speed: the moving averages of all tensors are updated with two
`torch._foreach_*` calls, the flip condition is read off one product m * w per weight tensor, and flips are counted on the device into one int64 counter
per tensor (no `.item()`, no host synchronisation inside `step`). Extra memory: one moving
average per weight, one counter per tensor, and temporaries no larger than the largest tensor.

`implementation="compiled"` runs the same arithmetic as one `torch.compile`d function (Inductor
fuses the whole step into a few kernels: the moving average, the flip test and the flip in one
pass over memory). It pays a one-time compilation (tens of seconds for ResNet-50 on a CPU, cached
on disk by Inductor) and is worth it for long runs of large models; `"auto"` picks it for at
least `COMPILE_MIN_WEIGHTS` weights when Inductor works on the device, the eager path otherwise.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

COMPILE_MIN_WEIGHTS = 5_000_000


CHUNK = 1 << 22


def _chunks(ts: list[torch.Tensor]):
    """Index ranges of consecutive tensors holding about CHUNK elements each."""
    lo, n = 0, 0
    for i, t in enumerate(ts):
        n += t.numel()
        if n >= CHUNK:
            yield lo, i + 1
            lo, n = i + 1, 0
    if lo < len(ts):
        yield lo, len(ts)


def _flip_(ms: list[torch.Tensor], ws: list[torch.Tensor], counts: list[torch.Tensor], tau: float) -> None:
    """Flip each weight where |m| >= tau and sign(m) == sign(w) != 0; count the flips."""
    sums = []
    for m, w in zip(ms, ws):
        f = torch.mul(m, w) > 0  # m and w non-zero with one sign
        if tau > 0:
            f &= m.abs() >= tau
        torch.where(f, w.neg(), w, out=w)
        sums.append(f.sum())
    torch._foreach_add_(counts, sums)


def _eager_step(ms, gs, ws, counts, ar: float, tau: float, first: bool) -> None:
    if first:  # m = g + ar * g (the original PaB code's first step)
        torch._foreach_copy_(ms, gs)
        for lo, hi in _chunks(gs):
            torch._foreach_add_(ms[lo:hi], torch._foreach_mul(gs[lo:hi], ar))
    else:
        torch._foreach_mul_(ms, 1.0 - ar)
        # ar * g rounded on its own before the sum (an `alpha=` add may fuse it into an FMA and
        # round differently); temporaries in chunks of at most CHUNK elements
        for lo, hi in _chunks(gs):
            torch._foreach_add_(ms[lo:hi], torch._foreach_mul(gs[lo:hi], ar))
    _flip_(ms, ws, counts, tau)


def _fused_step(ms, gs, ws, counts, ar: torch.Tensor, tau: torch.Tensor) -> None:
    for m, g, w, c in zip(ms, gs, ws, counts):
        m2 = m * (1.0 - ar) + g * ar
        f = (m2 * w > 0) & (m2.abs() >= tau)
        m.copy_(m2)
        w.copy_(torch.where(f, -w, w))
        c.add_(f.sum())


_compiled = None


def _compiled_step():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_fused_step, dynamic=False)
    return _compiled


class Bop(torch.optim.Optimizer):
    """Bop over the given parameters (all of them sign-trained).

    `flip_counts()` returns one int64 tensor per parameter (flips since the last
    `reset_flip_counts()`), still on the device; `set_ar` / `set_tau` change the schedule.
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
        for p in self._params():
            self.state[p]["flips"] = torch.zeros((), dtype=torch.int64, device=p.device)

    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def _use_compiled(self, ws: list[torch.Tensor]) -> bool:
        if self.implementation == "eager":
            return False
        if self.implementation == "compiled":
            return True
        return sum(w.numel() for w in ws) >= COMPILE_MIN_WEIGHTS

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            ar, tau = group["ar"], group["tau"]
            fresh, ms, gs, ws, counts = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "moving_average" not in st:
                    st["moving_average"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    fresh.append(len(ms))
                ms.append(st["moving_average"])
                gs.append(p.grad)
                ws.append(p)
                counts.append(st["flips"])
            if not ms:
                continue
            if fresh and self.init_average == "first_grad":
                # the first step of a tensor initialises its average from its gradient
                idx = set(fresh)
                part = lambda xs, keep: [x for i, x in enumerate(xs) if (i in idx) == keep]  # noqa: E731
                _eager_step(part(ms, True), part(gs, True), part(ws, True), part(counts, True), ar, tau, first=True)
                ms, gs, ws, counts = part(ms, False), part(gs, False), part(ws, False), part(counts, False)
                if not ms:
                    continue
            if self._use_compiled(ws):
                try:
                    dev = ws[0].device
                    _compiled_step()(ms, gs, ws, counts, torch.tensor(ar, device=dev), torch.tensor(tau, device=dev))
                    continue
                except Exception as e:  # Inductor unavailable here: the eager path computes the same thing
                    if self.implementation == "compiled":
                        raise
                    log.warning("Bop: torch.compile failed (%s: %s); using the eager step", type(e).__name__, str(e).splitlines()[0][:200])
                    self.implementation = "eager"
            _eager_step(ms, gs, ws, counts, ar, tau, first=False)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the int64 flip counters stay int64 (torch casts every other state
        tensor to its parameter's dtype, which would round counts above 2^24)."""
        state = {k: dict(v) for k, v in state_dict["state"].items()}
        counters = {k: v.pop("flips") for k, v in state.items() if "flips" in v}
        super().load_state_dict({**state_dict, "state": state})
        for i, p in enumerate(self._params()):
            if i in counters:
                self.state[p]["flips"] = counters[i].to(device=p.device, dtype=torch.int64)
            else:
                self.state[p].setdefault("flips", torch.zeros((), dtype=torch.int64, device=p.device))

    def flip_counts(self) -> list[torch.Tensor]:
        return [self.state[p]["flips"] for p in self._params()]

    def reset_flip_counts(self) -> None:
        for c in self.flip_counts():
            c.zero_()

    def set_ar(self, ar: float) -> None:
        for g in self.param_groups:
            g["ar"] = ar

    def set_tau(self, tau: float) -> None:
        for g in self.param_groups:
            g["tau"] = tau

    def extra_memory_bytes(self) -> int:
        """Bytes of optimizer state: the moving averages and the per-tensor counters."""
        return sum(t.numel() * t.element_size() for st in self.state.values() for t in st.values() if torch.is_tensor(t))
