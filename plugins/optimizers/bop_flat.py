"""Bop's flat layout: a param group's weights, gradients and moving averages as views of one
buffer each, and the per-tensor flip counts made from one flag per weight in a few operations.

A step over one flat vector is a fixed number of operations however many tensors the model has
(docs/bop.md).
"""
from __future__ import annotations

import torch

ROW = 512  # flags per counting row: 64 int64 words, each byte lane of their sum stays <= 64
CHUNK = 1 << 22  # the eager step's elements per pass (its scratch: 6 bytes per element)


class FlipCounter:
    """Per-tensor counts of the flags set in `flags` (int8 0/1, one per weight of the flat vector,
    zero past the last one), with ten operations whatever the number of tensors.

    Rows of ROW flags are summed as ROW/8 int64 words (each byte lane of the sum counts at most
    ROW/8 flags, so no lane carries into the next) and then as 8 bytes. Tensor t spans [b_t,
    b_t+1) of the flat vector; the flags in [0, b) are the rows before b's row plus the part of
    b's row before b (a masked gather of the boundary rows). Every buffer is allocated once."""

    def __init__(self, offsets: list[int], device: torch.device):
        n = offsets[-1]
        rows = n // ROW + 1
        i64 = dict(device=device, dtype=torch.int64)
        self.all_flags = torch.zeros(rows * ROW, device=device, dtype=torch.int8)
        self.flags = self.all_flags[:n]
        self.flag_words = self.all_flags.view(torch.int64).view(rows, ROW // 8)
        self.flag_rows = self.all_flags.view(rows, ROW)
        self.row_words = torch.empty(rows, **i64)
        self.row_word_bytes = self.row_words.view(torch.uint8).view(rows, 8)
        self.row_counts = torch.empty(rows, **i64)
        self.rows_before = torch.empty(rows, **i64)
        bounds = torch.tensor(offsets, dtype=torch.int64)
        bound_rows = bounds // ROW
        self.bound_rows = bound_rows.to(device)
        self.bound_masks = (torch.arange(ROW)[None, :] < (bounds - bound_rows * ROW)[:, None]).to(device=device, dtype=torch.int8)
        self.bound_flags = torch.empty_like(self.bound_masks)
        self.flags_before = torch.empty(len(offsets), **i64)
        self.bound_row_start = torch.empty(len(offsets), **i64)
        self.ends, self.starts = self.flags_before[1:], self.flags_before[:-1]

    def add_to(self, counts: torch.Tensor) -> None:
        torch.sum(self.flag_words, 1, out=self.row_words)
        torch.sum(self.row_word_bytes, 1, out=self.row_counts)
        torch.cumsum(self.row_counts, 0, out=self.rows_before)
        self.rows_before.sub_(self.row_counts)  # flags in the rows before each row
        torch.index_select(self.flag_rows, 0, self.bound_rows, out=self.bound_flags)
        self.bound_flags.mul_(self.bound_masks)
        torch.sum(self.bound_flags, 1, out=self.flags_before)
        torch.index_select(self.rows_before, 0, self.bound_rows, out=self.bound_row_start)
        self.flags_before.add_(self.bound_row_start)  # flags in [0, b) for each boundary b
        counts.add_(self.ends).sub_(self.starts)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.all_flags, self.row_words, self.row_counts, self.rows_before,
                                                         self.bound_rows, self.bound_masks, self.bound_flags,
                                                         self.flags_before, self.bound_row_start))


def dense_strides(p: torch.Tensor) -> tuple[int, ...]:
    """p's strides if its elements fill numel() consecutive slots (contiguous, channels_last, any
    permutation), else the contiguous strides of its shape."""
    span = 1
    for st, n in sorted((st, n) for n, st in zip(p.shape, p.stride()) if n != 1):
        if st != span:
            break
        span *= n
    else:
        if p.numel() > 0:
            return tuple(p.stride())
    strides, span = [], 1
    for n in reversed(p.shape):
        strides.append(span)
        span *= max(1, n)
    return tuple(reversed(strides))


class FlatGroup:
    """The weights, gradients and moving averages of one param group as views of one buffer each.

    Each parameter's `.data`, its `.grad` (when it has one) and `state[p]["moving_average"]` become
    views of `weights`, `grads` and `averages`, with the parameter's own strides; the per-tensor
    flip counters are the elements of `flip_counts` (`state[p]["flips"]` are views of it)."""

    def __init__(self, params: list, state: dict):
        dev, dt = params[0].device, params[0].dtype
        self.params = params
        self.group_list = None  # the param group's list this layout was made for (set by Bop)
        self.n_tensors = len(params)
        offsets = [0]
        for p in params:
            offsets.append(offsets[-1] + p.numel())
        self.numel = offsets[-1]
        geometry = [(tuple(p.shape), dense_strides(p), o) for p, o in zip(params, offsets)]
        self.weights = torch.empty(self.numel, device=dev, dtype=dt)
        self.grads = torch.zeros(self.numel, device=dev, dtype=dt)
        self.averages = torch.zeros(self.numel, device=dev, dtype=dt)
        self.weight_views = [self.weights.as_strided(s, st, o) for s, st, o in geometry]
        self.grad_views = [self.grads.as_strided(s, st, o) for s, st, o in geometry]
        self.average_views = [self.averages.as_strided(s, st, o) for s, st, o in geometry]
        self._adopt(params, state, dev, dt)
        self.counter = FlipCounter(offsets, dev)
        self.flags = self.counter.flags
        self.data_ptrs = [p.data_ptr() for p in params]
        self._scratch = self._chunks = None
        self.coefficients = None  # (1 - ar, ar, tau, first) on the device, for the compiled step
        self.coefficient_values = None

    def _adopt(self, params: list, state: dict, dev, dt) -> None:
        """Copy the parameters, their gradients, moving averages and flip counts into the layout
        and point the parameters and the state at its views."""
        torch._foreach_copy_(self.weight_views, [p.detach() for p in params])
        old = [(i, state[p]["moving_average"]) for i, p in enumerate(params) if "moving_average" in state[p]]
        if old:
            torch._foreach_copy_([self.average_views[i] for i, _ in old], [m.to(dev, dt) for _, m in old])
        with_grad = [(i, p.grad) for i, p in enumerate(params) if p.grad is not None]
        if with_grad:
            torch._foreach_copy_([self.grad_views[i] for i, _ in with_grad], [g for _, g in with_grad])
        for i, p in enumerate(params):
            p.data = self.weight_views[i]
        for i, _ in with_grad:
            params[i].grad = self.grad_views[i]
        flips = [state[p].get("flips") for p in params]
        self.flip_counts = torch.stack([torch.zeros((), dtype=torch.int64, device=dev) if c is None else c.to(dev, torch.int64).reshape(())
                                        for c in flips])
        self.count_views = list(self.flip_counts.unbind(0))
        self.fresh = ["moving_average" not in state[p] for p in params]
        self.n_fresh = sum(self.fresh)
        for i, p in enumerate(params):
            state[p]["flips"] = self.count_views[i]
            if not self.fresh[i]:
                state[p]["moving_average"] = self.average_views[i]

    def matches(self, params: list) -> bool:
        """The group still holds these parameters and they still live in `weights`."""
        return (params is self.group_list and len(params) == self.n_tensors
                and list(map(torch.Tensor.data_ptr, params)) == self.data_ptrs)

    def chunks(self) -> list:
        """The eager step's views, CHUNK weights each: (averages, grads, weights, flags, float
        scratch, two bool scratch)."""
        if self._chunks is None:
            k = min(CHUNK, max(1, self.numel))
            dev = self.weights.device
            self._scratch = (torch.empty(k, device=dev, dtype=self.weights.dtype), torch.empty(k, device=dev, dtype=torch.bool),
                             torch.empty(k, device=dev, dtype=torch.bool))
            flags = self.flags.view(torch.bool)
            self._chunks = []
            for lo in range(0, self.numel, CHUNK):
                hi = min(self.numel, lo + CHUNK)
                self._chunks.append((self.averages[lo:hi], self.grads[lo:hi], self.weights[lo:hi], flags[lo:hi],
                                     *(t[: hi - lo] for t in self._scratch)))
        return self._chunks

    def set_coefficients(self, ar: float, tau: float, first: bool) -> tuple:
        """The device scalars of the compiled step, refilled in place when a value changes (a fill is
        a kernel launch with the value as its argument: no host-to-device copy, no synchronisation)."""
        values = (ar, tau, first)
        if self.coefficients is None:
            dev, dt = self.weights.device, self.weights.dtype
            self.coefficients = (torch.empty((), device=dev, dtype=dt), torch.empty((), device=dev, dtype=dt),
                                 torch.empty((), device=dev, dtype=dt), torch.empty((), device=dev, dtype=torch.bool))
        if values != self.coefficient_values:
            old = self.coefficient_values or (None, None, None)
            decay, rate, threshold, first_step = self.coefficients
            if ar != old[0]:
                decay.fill_(1.0 - ar)
                rate.fill_(ar)
            if tau != old[1]:
                threshold.fill_(tau)
            if first != old[2]:
                first_step.fill_(first)
            self.coefficient_values = values
        return self.coefficients

    def count(self) -> None:
        self.counter.add_to(self.flip_counts)

    def nbytes_scratch(self) -> int:
        n = self.counter.nbytes()
        if self._scratch is not None:
            n += sum(t.numel() * t.element_size() for t in self._scratch)
        return n
