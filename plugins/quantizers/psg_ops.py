"""Predictive Sign Gradient (PSG, from E2-Train) for one Conv2d or Linear layer, as PaB runs it.

What it computes
----------------
Forward: the plain layer's, op for op (under autocast too: the input, weight and bias are cast
to the autocast dtype exactly as autocast casts them for `F.conv2d` / `F.linear`). Backward:
- the input and bias gradients are the plain layer's (full precision);
- the weight gradient comes from low-precision copies: the layer input x quantised to
  `msb_bits` and the output gradient g quantised to `msb_bits_grad`, then one weight-gradient
  conv/matmul on them: g_msb (computed in the forward's dtype, like the plain layer's);
- an entry of g_msb is dropped where |g_msb| < thr (thr = `threshold` x max|g_msb| when
  relative, `threshold` itself when absolute; thr is rounded to float32 as the entries are);
  a dropped entry becomes 0 (`sparsify`) or the full-precision weight gradient; `take_sign`
  replaces the result by `torch.sign` of it. A NaN entry or a NaN threshold drops nothing, so a
  non-finite gradient stays visible to a loss scaler. The result has the parameter's dtype.

The quantiser (x and g alike) is `torch.fake_quantize_per_tensor_affine`'s definition:
    q = clamp(z + rint(v * (1/D)), 0, 2^bits - 1),    v_hat = (q - z) * D
with D and 1/D float32 (1/D the correctly rounded reciprocal), v * (1/D) a float32 product and
rint rounding half to even (ties go to the even code). Ranges:
- x: m = the mean over the batch of each sample's max|x| (summed in float64);
  x >= 0 everywhere: [0, m], D = m / 2^bits, z = 0; otherwise [-m, m], D = 2m / 2^bits,
  z = 2^(bits-1). D is rounded to float32 once; D = 0 (x all zero) is taken as 1.
- g: m = max|g| over the whole tensor; [-m, m], D = 2m / 2^bits, z = 2^(bits-1).
Zero maps to code z and back to exactly 0. A non-finite x or g makes D non-finite and so the
whole quantised copy: the weight gradient is then non-finite, as the plain layer's would be.

What is saved for backward: what the plain layer saves (its input, as cast for the forward, and
its weight), nothing more. In the networks PaB trains the conv input is a ReLU's output, which
autograd keeps for the ReLU's backward anyway: an 8-bit copy saved next to it would only add
memory. The quantisation therefore happens in the backward pass, on the saved input, and the
backward orders its work so that its temporaries (the two quantised copies, g_msb) are gone as
early as possible: g_msb is made first, then the plain input gradient, then the threshold.

When no weight gradient is wanted (under `torch.no_grad()` / inference mode, or with a frozen
weight) the layer is the plain `F.conv2d` / `F.linear`: nothing is quantised.

Where it runs (the same definition everywhere; the path is chosen per call by the device)
-----------------------------------------------------------------------------------------
The parts that are the plain layer's (the convolution, its input-gradient call, the matmuls) are
the same aten ops on every path. The rest, in launches per layer and step beyond the plain
layer's (views and allocations not counted; Conv2d, default settings, fp32):
- CPU tensors (`_HostPath`), 12 aten ops: per-sample `amin`/`amax` of x and `aminmax` of g and of
  g_msb (their results are read to Python: a CPU has no device to wait for), the two quantised
  copies in five `_foreach` passes over both tensors (multiply, round, clamp below and above,
  multiply: the fake-quantise arithmetic above, vectorised; the fake-quantise kernels are scalar
  loops on a CPU, four times slower, and are used only for other dtypes than float32 and for
  the settings below: then 9 ops), the second `convolution_backward`, an in-place `hardshrink`
  (threshold and sparsify) and one `count_nonzero` written into a ring of per-step counts
  (folded into the total every 64 steps). `sparsify: false` adds 2 (a compare and a select),
  `take_sign` 1: with either, the copies take the two fake-quantise calls, to stay within 12.
- CUDA with Triton (`psg_triton.py`), 6 launches and no host sync: `aminmax` of x per sample,
  `vector_norm(ord=inf)` of g and of g_msb, the second `convolution_backward`, one kernel for
  both quantised copies and one for the threshold, fill, sign, cast and kept count (an atomic
  add per program); their scalars are read on the device. A kernel that fails to build falls
  back, with one warning, to:
- any other device (`_DevicePath`): the same definition in aten ops whose scalars stay on the
  device (more, smaller launches; no host sync).
`PAB_PSG_BACKEND=host|device|triton` forces a path (tests; `triton` on CPU tensors needs
`TRITON_INTERPRET=1`). The tests hold the three paths to each other bitwise.
"""
from __future__ import annotations

import logging
import math
import os
import struct
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_INF = float("inf")


@dataclass(frozen=True)
class PsgConfig:
    msb_bits: int = 8
    msb_bits_weight: int = 8
    msb_bits_grad: int = 16
    threshold: float = 1e-7
    threshold_mode: str = "relative"  # relative | absolute
    sparsify: bool = True
    take_sign: bool = False


class PsgStats:
    """Weight-gradient entries kept by the threshold since the last reset, out of `total` (a host
    int). The count stays on the device, in three parts: `kept` (added to directly, e.g. by the
    CUDA kernel's atomics), a ring of per-step counts that an op writes into with `out=` (one op
    per step instead of a count and an add; folded into `kept` every `RING` steps), and
    `kept_host` (what the host decided, e.g. "all kept" when the threshold is 0)."""

    RING = 64

    def __init__(self, device):
        self.kept = torch.zeros((), dtype=torch.int64, device=device)
        self.kept_host = 0
        self.total = 0
        self._ring = None
        self._pos = 0

    def counter(self, device) -> torch.Tensor:
        if self.kept.device != device:  # the model moved after PSG.apply
            self.kept = self.kept.to(device)
        return self.kept

    def slot(self, device) -> torch.Tensor:
        """A 0-dim int64 tensor on `device` to write this step's count into."""
        if self._ring is None or self._ring.device != device:
            if self._ring is not None:
                self.counter(device).add_(self._ring[: self._pos].sum().to(device))
            self._ring, self._pos = torch.zeros(self.RING, dtype=torch.int64, device=device), 0
        if self._pos == self.RING:
            self.counter(device).add_(self._ring.sum())
            self._pos = 0
        self._pos += 1
        return self._ring[self._pos - 1]

    def kept_on_device(self) -> torch.Tensor:
        if self._ring is None or not self._pos:
            return self.kept
        return self.kept + self._ring[: self._pos].sum().to(self.kept.device)

    def reset(self) -> None:
        self.kept.zero_()
        self.kept_host = 0
        self.total = 0
        self._pos = 0


# ---------------------------------------------------------------------------- shared helpers
def _autocast_dtype(device_type: str):
    """The dtype autocast would run a conv/linear in on this device, or None."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return None
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        return None


def _cast(t, dt):
    """Autocast's cast: floating tensors other than float64 go to `dt`."""
    if dt is None or t is None or not t.is_floating_point() or t.dtype in (dt, torch.float64):
        return t
    return t.to(dt)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as (samples, rest) with a sample per row, a view for contiguous and channels_last x."""
    if x.dim() <= 1:
        return x.reshape(1, -1)
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    return x.reshape(x.shape[0], -1)


def _f32(v: float) -> float:
    """v rounded to float32 (to nearest even; overflow to inf)."""
    try:
        return struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:
        return math.copysign(_INF, v)


def _below(v: float) -> float:
    """The largest float32 below a positive float32 v."""
    (bits,) = struct.unpack("<I", struct.pack("<f", v))
    return struct.unpack("<f", struct.pack("<I", bits - 1))[0]


def _combine_dtype(param_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def input_scale(mins: list[float], maxs: list[float], bits: int) -> tuple[float, int]:
    """(D, z) of the input quantiser from each sample's min and max (module docstring)."""
    acc = 0.0
    for lo, hi in zip(mins, maxs):
        if lo != lo or hi != hi:  # NaN
            acc = math.nan
            break
        acc += hi if hi >= -lo else -lo
    signed = min(mins) < 0
    d = _f32(acc / len(mins) * (2.0 if signed else 1.0) / 2**bits)
    return (d if d != 0 else 1.0), (2 ** (bits - 1) if signed else 0)


def grad_scale(gmax: float, bits: int) -> float:
    """D of the output-gradient quantiser from max|g| (module docstring)."""
    d = _f32(gmax * 2.0 / 2**bits)
    return d if d != 0 else 1.0


HOST_READS = 0  # small results read to Python by the CPU path (counted for the op-count test)


def _host(t: torch.Tensor):
    global HOST_READS
    HOST_READS += 1
    return t.tolist()


_CONSTS: dict = {}  # small constant tensors, made once


# ---------------------------------------------------------------------------- CPU: host scalars
class _HostPath:
    name = "host"

    @staticmethod
    def _absmax(t) -> float:
        lo, hi = torch.aminmax(t)  # (vectorised on the CPU, unlike linalg.vector_norm(ord=inf))
        lo, hi = _host(lo), _host(hi)
        return math.nan if lo != lo or hi != hi else max(hi, -lo)

    @staticmethod
    def _fq(t, d: float, z: int, bits: int):
        """fake_quantize_per_tensor_affine(t, d, z, 0, 2^bits - 1), computed by the per-channel op with
        the same scale for every channel (the same arithmetic; on the CPU about twice as fast)."""
        zp = _CONSTS.get(("zp", z))
        if zp is None:
            zp = _CONSTS[("zp", z)] = torch.tensor([z], dtype=torch.int32)
        n = t.shape[0]
        return torch.fake_quantize_per_channel_affine(t, torch.tensor([d]).expand(n), zp.expand(n), 0, 0, 2**bits - 1)

    @classmethod
    def quantize(cls, x, g, cfg: PsgConfig):
        rows = _rows(x)  # (amax and amin along a dim are vectorised on the CPU; aminmax along a dim is not)
        d, z = input_scale(_host(rows.amin(1)), _host(rows.amax(1)), cfg.msb_bits)
        bits = cfg.msb_bits_grad
        dg, zg = grad_scale(cls._absmax(g), bits), 2 ** (bits - 1)
        if x.dtype == g.dtype == torch.float32 and cfg.sparsify and not cfg.take_sign:
            # the same arithmetic in five vectorised passes over both tensors at once: about 4x faster than
            # the fake-quantise kernels, which are scalar loops on the CPU. Only with PaB's settings: keeping
            # the full-precision gradient or taking signs costs 2-3 ops more elsewhere, and the two
            # fake-quantise calls keep those settings within 12 ops of the plain layer too
            inv = [_f32(1.0 / d), _f32(1.0 / dg)]
            q = torch._foreach_mul([x, g], inv)  # v * (1/D), a float32 product
            torch._foreach_round_(q)  # to nearest, ties to even
            torch._foreach_clamp_min_(q, [-z, -zg])
            torch._foreach_clamp_max_(q, [2**cfg.msb_bits - 1 - z, 2**bits - 1 - zg])
            torch._foreach_mul_(q, [d, dg])  # (q - z) * D
            return q[0], q[1]
        xq = cls._fq(x.reshape(1, -1) if x.dim() < 2 else x, d, z, cfg.msb_bits).view_as(x)
        gq = cls._fq(g.reshape(1, -1) if g.dim() < 2 else g, dg, zg, bits).view_as(g)
        return xq, gq

    @classmethod
    def combine(cls, box, r_full, cfg: PsgConfig, stats: PsgStats | None, out_dtype):
        cd = _combine_dtype(out_dtype)
        r = box.pop().to(cd)  # g_msb, ours alone from here: written in place
        if cfg.threshold_mode == "relative":
            m = cls._absmax(r)
            thr = m * cfg.threshold if cd == torch.float64 else _f32(_f32(cfg.threshold) * m)
        else:
            thr = cfg.threshold if cd == torch.float64 else _f32(cfg.threshold)
        n = r.numel()
        if not thr > 0:  # 0 or NaN: nothing is dropped
            out = r.sign() if cfg.take_sign else r
            if stats is not None:
                stats.kept_host += n
        else:
            lam = math.nextafter(thr, 0.0) if cd == torch.float64 else _below(thr)
            out = torch.ops.aten.hardshrink.out(r, lam, out=r)  # 0 where |r| <= lam, i.e. |r| < thr: the dropped entries
            if stats is not None:  # kept entries are exactly the nonzero ones (|r| >= thr > 0)
                torch.ops.aten.count_nonzero.out(out, out=stats.slot(out.device))
            if not cfg.sparsify:
                out = torch.where(out == 0, r_full, out)  # (promotes a bf16 r_full itself)
            if cfg.take_sign:
                out = out.sign_()
        if stats is not None:
            stats.total += n
        return out.to(out_dtype)


# ---------------------------------------------------------------------------- any device: device scalars


def _const(value, dtype, device) -> torch.Tensor:
    key = (value, dtype, device)
    t = _CONSTS.get(key)
    if t is None:
        t = _CONSTS[key] = torch.full((1,), value, dtype=dtype, device=device)
    return t


class _DevicePath:
    name = "device"

    @staticmethod
    def _fq(v, scale, zp, bits):
        one = _const(1, torch.long, v.device)
        return torch._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(v, scale, zp, one, 0, 2**bits - 1)[0]

    @classmethod
    def quantize(cls, x, g, cfg: PsgConfig):
        bits = cfg.msb_bits
        mins, maxs = torch.aminmax(_rows(x), dim=1)
        m = torch.maximum(maxs, mins.neg()).double().mean()
        signed = mins.amin() < 0
        d = (m * torch.where(signed, 2.0, 1.0) / 2**bits).float().reshape(1)
        d = torch.where(d == 0, 1.0, d)
        z = (signed.to(torch.int32) * 2 ** (bits - 1)).reshape(1)
        xq = cls._fq(x, d, z, bits)
        bg = cfg.msb_bits_grad
        dg = (torch.linalg.vector_norm(g, _INF).float() * (2.0 / 2**bg)).reshape(1)
        dg = torch.where(dg == 0, 1.0, dg)
        gq = cls._fq(g, dg, _const(2 ** (bg - 1), torch.int32, g.device), bg)
        return xq, gq

    @staticmethod
    def combine(box, r_full, cfg: PsgConfig, stats: PsgStats | None, out_dtype):
        r = box.pop().to(_combine_dtype(out_dtype))
        a = r.abs()
        thr = torch.linalg.vector_norm(r, _INF) * cfg.threshold if cfg.threshold_mode == "relative" else cfg.threshold
        drop = a < thr
        out = torch.where(drop, 0.0 if r_full is None else r_full.to(r.dtype), r)
        if cfg.take_sign:
            out = out.sign_()
        if stats is not None:
            stats.kept_host += r.numel()
            stats.total += r.numel()
            stats.counter(r.device).sub_(drop.sum())
        return out.to(out_dtype)


# ---------------------------------------------------------------------------- choosing a path
_TRITON = None  # the psg_triton module once imported, False when unavailable


def _triton():
    global _TRITON
    if _TRITON is None:
        try:
            from . import psg_triton
            _TRITON = psg_triton
        except Exception as e:  # no Triton (e.g. Windows, or a CPU-only build)
            log.info("psg: Triton unavailable (%s); using the aten path", e)
            _TRITON = False
    return _TRITON


def _path(t: torch.Tensor, param_dtype: torch.dtype):
    forced = os.environ.get("PAB_PSG_BACKEND")
    if forced == "host":
        return _HostPath
    if forced == "device":
        return _DevicePath
    if forced == "triton" or (t.is_cuda and param_dtype != torch.float64):
        k = _triton()
        if k and k.usable():
            return k.TritonPath
        return _DevicePath
    if t.device.type == "cpu":
        return _HostPath
    return _DevicePath


# ---------------------------------------------------------------------------- autograd functions
def _save(ctx, xc, weight, wc, dt):
    """What the plain layer keeps for backward, no more: its (cast) input, and its weight. Under
    autocast the plain layer keeps the cast copy of the weight until its backward ends; here the
    parameter itself is saved and the copy is lent to the first backward (`ctx.wc`), which drops
    it as soon as the convolutions are done, before the weight gradient is cast and thresholded."""
    ctx.save_for_backward(xc, weight)
    ctx.wc = wc if wc is not weight else None
    ctx.dt = dt


def _restore(ctx):
    xc, weight = ctx.saved_tensors
    wc = ctx.wc if ctx.wc is not None else _cast(weight, ctx.dt)  # (cast again only when backward runs twice)
    ctx.wc = None
    return xc, wc


def _conv_backward(g, x, w, conv, mask):
    """The plain layer's convolution_backward, outputs not asked for as None (a backend may fill them)."""
    stride, padding, dilation, groups = conv
    outs = torch.ops.aten.convolution_backward(g, x, w, [w.shape[0]] if mask[2] else None, stride, padding, dilation,
                                               False, [0, 0], groups, mask)
    return [o if m else None for o, m in zip(outs, mask)]


class _PsgConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, cfg: PsgConfig, stats):
        dt = _autocast_dtype(x.device.type)
        xc, wc, bc = _cast(x, dt), _cast(weight, dt), _cast(bias, dt)
        out = F.conv2d(xc, wc, bc, stride, padding, dilation, groups)
        _save(ctx, xc, weight, wc, dt)
        ctx.conf = (stride, padding, dilation, groups, cfg, stats, x.dtype, weight.dtype,
                    None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx, g):
        xc, wc = _restore(ctx)
        stride, padding, dilation, groups, cfg, stats, x_dtype, w_dtype, b_dtype = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and b_dtype is not None
        stride, padding, dilation = list(stride), list(padding), list(dilation)

        conv = (stride, padding, dilation, groups)
        gx = gb = gw = r_full = None
        full = need_w and not cfg.sparsify
        if full:  # the input, full-precision weight and bias gradients in one call
            gx, r_full, gb = _conv_backward(g, xc, wc, conv, [need_x, True, need_b])
        if need_w:  # g_msb first, so that the quantised copies are gone before the input gradient is made
            path = _path(g, w_dtype)
            xq, gq = path.quantize(xc, g, cfg)
            box = [torch.ops.aten.convolution_backward(gq, xq, wc, None, stride, padding, dilation, False, [0, 0], groups,
                                                       [False, True, False])[1]]
            del xq, gq
        if not full and (need_x or need_b):
            gx, _, gb = _conv_backward(g, xc, wc, conv, [need_x, False, need_b])
        del wc
        if need_w:
            gw = path.combine(box, r_full, cfg, stats, w_dtype)  # takes g_msb out of the box: it may reuse its memory
            del r_full
        if gx is not None and gx.dtype != x_dtype:
            gx = gx.to(x_dtype)
        if gb is not None and gb.dtype != b_dtype:
            gb = gb.to(b_dtype)
        return gx, gw, gb, None, None, None, None, None, None


class _PsgLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, cfg: PsgConfig, stats):
        dt = _autocast_dtype(x.device.type)
        xc, wc, bc = _cast(x, dt), _cast(weight, dt), _cast(bias, dt)
        out = F.linear(xc, wc, bc)
        _save(ctx, xc, weight, wc, dt)
        ctx.conf = (cfg, stats, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx, g):
        xc, wc = _restore(ctx)
        cfg, stats, x_dtype, w_dtype, b_dtype = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gb = gw = r_full = None
        g2 = g.reshape(-1, g.shape[-1])
        if need_w:  # g_msb first, so that the quantised copies are gone before the input gradient is made
            path = _path(g, w_dtype)
            xq, gq = path.quantize(xc, g, cfg)
            box = [gq.reshape(-1, g.shape[-1]).t() @ xq.reshape(-1, wc.shape[1])]
            del xq, gq
            r_full = None if cfg.sparsify else g2.t() @ xc.reshape(-1, wc.shape[1])
        if need_x:
            gx = g @ wc
            if gx.dtype != x_dtype:
                gx = gx.to(x_dtype)
        del wc
        if need_b and b_dtype is not None:
            gb = g2.sum(0)
            if gb.dtype != b_dtype:
                gb = gb.to(b_dtype)
        if need_w:
            gw = path.combine(box, r_full, cfg, stats, w_dtype)  # takes g_msb out of the box: it may reuse its memory
        return gx, gw, gb, None, None


def _wants_weight_grad(weight: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and weight.requires_grad


def psg_conv2d(x, weight, bias, stride, padding, dilation, groups, cfg: PsgConfig, stats=None):
    """`F.conv2d` whose weight gradient is PSG's (module docstring); the plain conv when no weight
    gradient is wanted."""
    if not _wants_weight_grad(weight):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return _PsgConv2d.apply(x, weight, bias, stride, padding, dilation, groups, cfg, stats)


def psg_linear(x, weight, bias, cfg: PsgConfig, stats=None):
    """`F.linear` whose weight gradient is PSG's (module docstring); the plain linear when no
    weight gradient is wanted."""
    if not _wants_weight_grad(weight):
        return F.linear(x, weight, bias)
    return _PsgLinear.apply(x, weight, bias, cfg, stats)
