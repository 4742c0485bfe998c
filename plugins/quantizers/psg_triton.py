"""PSG's fused steps as two Triton kernels (CUDA; CPU tensors under `TRITON_INTERPRET=1`).

The definition they compute is docs/psg.md's; `psg_quant.HostPath` is the same arithmetic in
aten ops and the tests hold the two to each other bitwise.

- `_quantize_pair`: the layer input x and the output gradient g quantised in one launch. The
  programs of the first part each take x's range from the per-sample minima and maxima
  (`aminmax`, read on the device) and fake-quantise one block of x; the others take g's from
  max|g| and fake-quantise one block of g.
- `_combine`: threshold, fill (0 or the full-precision gradient), sign, cast to the parameter's
  dtype and the counts (one atomic add of the kept entries per program into the layer's
  [kept, total] pair; the first program adds the total).
A kernel that fails to build falls back, with one warning, to `psg_quant.DevicePath`.
"""
from __future__ import annotations

import logging
import math
import os

import torch
import triton
import triton.language as tl

from .psg_quant import DevicePath, PsgConfig, sample_rows

log = logging.getLogger(__name__)

BLOCK = 4096
NSB = 256  # per-sample statistics read per loop step


_BROKEN: list[str] = []  # kernels that failed to build here: the aten path serves from then on
_GOOD: set[str] = set()  # kernels that ran once: trusted from then on


def usable() -> bool:
    return not _BROKEN


def kernels_run() -> set[str]:
    """The kernels that have run in this process."""
    return set(_GOOD)


@triton.jit
def _rint(v):
    """Round half to even (as nearbyint in the default rounding mode), exactly."""
    f = tl.floor(v)
    d = v - f  # exact
    odd = (f - 2.0 * tl.floor(0.5 * f)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _cast_out(v, ptr):
    """v (float32) in ptr's dtype, rounded to nearest even. For bfloat16 the rounding is done here
    in integer arithmetic, so the cast itself is exact (the Triton interpreter's cast truncates)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        v = tl.where(v != v, v, u.to(tl.float32, bitcast=True))
    return v.to(ptr.dtype.element_ty)


@triton.jit
def _fake_quantize(v, scale, zp, qmax):
    scale = tl.where(scale == 0.0, 1.0, scale)
    inv = (1.0 / scale.to(tl.float64)).to(tl.float32)
    q = _rint(v * inv) + zp
    q = tl.minimum(tl.maximum(q, 0.0), qmax)
    return (q - zp) * scale


@triton.jit
def _quantize_pair(x_ptr, xq_ptr, nx, mins_ptr, maxs_ptr, ns, g_ptr, gq_ptr, ng, gmax_ptr, nbx,
                   X_LEVELS: tl.constexpr, G_LEVELS: tl.constexpr, BLOCK: tl.constexpr, NSB: tl.constexpr):
    pid = tl.program_id(0)
    if pid < nbx:
        acc = tl.zeros([NSB], dtype=tl.float64)
        lo = tl.full([NSB], float("inf"), dtype=tl.float32)
        for i in range(0, ns, NSB):
            o = i + tl.arange(0, NSB)
            ms = o < ns
            a = tl.load(mins_ptr + o, mask=ms, other=0.0).to(tl.float32)
            b = tl.load(maxs_ptr + o, mask=ms, other=0.0).to(tl.float32)
            # (a - a) + (b - b) is 0, or NaN when a or b is not finite: the range becomes NaN
            acc += (tl.maximum(b, -a) + ((a - a) + (b - b))).to(tl.float64)
            lo = tl.minimum(lo, tl.where(ms, a, float("inf")))
        signed = tl.min(lo, 0) < 0.0
        mean = tl.sum(acc, 0) / ns
        scale = (mean * tl.where(signed, 2.0, 1.0) / X_LEVELS).to(tl.float32)
        zp = tl.where(signed, X_LEVELS * 0.5, 0.0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        m = offs < nx
        v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        out = _fake_quantize(v, scale, zp, X_LEVELS - 1.0)
        tl.store(xq_ptr + offs, _cast_out(out, xq_ptr), mask=m)
    else:
        gm = tl.load(gmax_ptr).to(tl.float32)
        scale = gm * (2.0 / G_LEVELS)  # a power of two: exact
        offs = (pid - nbx) * BLOCK + tl.arange(0, BLOCK)
        m = offs < ng
        v = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        out = _fake_quantize(v, scale, G_LEVELS * 0.5, G_LEVELS - 1.0)
        tl.store(gq_ptr + offs, _cast_out(out, gq_ptr), mask=m)


@triton.jit(do_not_specialize=["n"])
def _combine(r_ptr, full_ptr, out_ptr, n, rmax_ptr, counts_ptr, t,
             RELATIVE: tl.constexpr, SPARSIFY: tl.constexpr, SIGN: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    r = tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if RELATIVE:
        thr = tl.load(rmax_ptr).to(tl.float32) * t
    else:
        thr = t
    drop = tl.abs(r) < thr  # NaN entries and a NaN threshold drop nothing
    if SPARSIFY:
        o = tl.where(drop, 0.0, r)
    else:
        o = tl.where(drop, tl.load(full_ptr + offs, mask=m, other=0.0).to(tl.float32), r)
    if SIGN:  # torch.sign: NaN and -0 give 0
        o = tl.where(o > 0.0, 1.0, tl.where(o < 0.0, -1.0, 0.0))
    tl.store(out_ptr + offs, _cast_out(o, out_ptr), mask=m)
    tl.atomic_add(counts_ptr, tl.sum(tl.where(m & (drop == 0), 1, 0).to(tl.int64), 0))
    if pid == 0:
        tl.atomic_add(counts_ptr + 1, n.to(tl.int64))


def launch(kernel, programs: int, *args, **kw) -> None:
    """Launch `kernel` on a 1-d grid of `programs` (every launch of this module goes through here)."""
    kernel[(programs,)](*args, **kw)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t itself when its elements fill its memory in some dim order (contiguous, channels_last), else a copy."""
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return t
    return t.contiguous()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _OnDevice:
    def __init__(self, t):
        self.ctx = torch.cuda.device(t.device) if t.is_cuda and t.device.index != torch.cuda.current_device() else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *a):
        if self.ctx is not None:
            self.ctx.__exit__(*a)


def _guarded(kernel_name: str, run, fallback):
    """`run()` (which launches the kernel); if this kernel has never run, a failure to build or
    launch it falls back to the aten path for the rest of the process, with one warning (a kernel
    that ran once is trusted)."""
    if kernel_name in _GOOD:
        return run()
    try:
        out = run()
    except Exception as e:  # a Triton/driver combination this kernel does not build on
        if os.environ.get("PAB_PSG_BACKEND") == "triton":
            raise
        log.warning("psg: the Triton kernel %s failed (%s: %s); using the aten path", kernel_name, type(e).__name__, e)
        _BROKEN.append(kernel_name)
        return fallback()
    _GOOD.add(kernel_name)
    return out


class TritonPath:
    name = "triton"

    @staticmethod
    def quantize(x: torch.Tensor, g: torch.Tensor, cfg: PsgConfig) -> tuple[torch.Tensor, torch.Tensor]:
        x, g = _dense(x), _dense(g)
        mins, maxs = torch.aminmax(sample_rows(x), dim=1)
        gmax = torch.linalg.vector_norm(g, math.inf)

        def run():
            xq, gq = torch.empty_like(x), torch.empty_like(g)
            nbx, nbg = _cdiv(x.numel(), BLOCK), _cdiv(g.numel(), BLOCK)
            if nbx + nbg:
                with _OnDevice(x):
                    launch(_quantize_pair, nbx + nbg, x, xq, x.numel(), mins, maxs, mins.numel(), g, gq, g.numel(), gmax, nbx,
                           X_LEVELS=float(2**cfg.msb_bits), G_LEVELS=float(2**cfg.msb_bits_grad), BLOCK=BLOCK, NSB=NSB,
                           num_warps=8)
            return xq, gq

        return _guarded("quantize_pair", run, lambda: DevicePath.quantize(x, g, cfg))

    @staticmethod
    def combine(msb_grad: torch.Tensor, full_grad: torch.Tensor | None, cfg: PsgConfig, counts: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
        r = _dense(msb_grad)
        relative = cfg.threshold_mode == "relative"
        rmax = torch.linalg.vector_norm(r, math.inf) if relative else r  # (unused when absolute)
        if full_grad is not None and full_grad.stride() != r.stride():
            r, full_grad = r.contiguous(), full_grad.contiguous()

        def run():
            out = r if r.dtype == out_dtype else torch.empty_like(r, dtype=out_dtype)  # in place when it can
            n = r.numel()
            if n:
                with _OnDevice(r):
                    launch(_combine, _cdiv(n, BLOCK), r, r if full_grad is None else full_grad, out, n, rmax, counts,
                           float(cfg.threshold), RELATIVE=relative, SPARSIFY=full_grad is None, SIGN=cfg.take_sign,
                           BLOCK=BLOCK, num_warps=8)
            return out

        return _guarded("combine", run, lambda: DevicePath.combine(r, full_grad, cfg, counts, out_dtype))
