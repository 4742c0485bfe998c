"""PSG (Predictive Sign Gradient, from E2-Train) for one Conv2d or Linear layer, as PaB runs it.

Forward and the input and bias gradients are the plain layer's (under autocast too); the weight
gradient comes from the layer input quantised to `msb_bits` and the output gradient quantised to
`msb_bits_grad`, thresholded, filled and signed as docs/psg.md defines. That weight gradient is
one registered operator per layer kind (`pab::psg_conv2d_weight_grad`,
`pab::psg_linear_weight_grad`) with a fake implementation, so `torch.compile` keeps the whole
model in one graph and leaves the op's inside to the path chosen per call by the device: the
vectorised CPU passes (`psg_quant.HostPath`), the Triton kernels on CUDA (`psg_triton`), aten ops
with device scalars elsewhere (`psg_quant.DevicePath`). `PAB_PSG_BACKEND=host|device|triton` forces
a path (tests; `triton` on CPU tensors needs `TRITON_INTERPRET=1`).

Saved for backward: what the plain layer saves (its cast input and weight), nothing more. Without
a weight gradient to make (no_grad, inference mode, a frozen weight) the layer is the plain one.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .psg_quant import DevicePath, HostPath, PsgConfig

log = logging.getLogger(__name__)

__all__ = ["PsgConfig", "PsgStats", "psg_conv2d", "psg_linear", "path_for", "conv2d_weight_grad", "linear_weight_grad",
           "conv2d_weight_grad_op", "linear_weight_grad_op"]


class PsgStats:
    """Weight-gradient entries kept by the threshold, and all entries, since the last reset: one
    int64 [kept, total] pair on the layer's device that the weight-gradient op adds to (the host
    reads it once an epoch)."""

    def __init__(self, device):
        self.counts = torch.zeros(2, dtype=torch.int64, device=device)

    def counts_on(self, device: torch.device) -> torch.Tensor:
        if self.counts.device != device:  # the model moved after PSG.apply
            self.counts = self.counts.to(device)
        return self.counts

    def reset(self) -> None:
        self.counts.zero_()


# ---------------------------------------------------------------------------- the path per call
_TRITON = None  # the psg_triton module once imported, False when unavailable


def _triton():
    global _TRITON
    if _TRITON is None:
        try:  # imported on first use: Triton is optional (absent on CPU-only builds and on Windows)
            from . import psg_triton
            _TRITON = psg_triton
        except Exception as e:
            log.info("psg: Triton unavailable (%s); using the aten path", e)
            _TRITON = False
    return _TRITON


def path_for(t: torch.Tensor, param_dtype: torch.dtype):
    """The path computing the weight gradient of a layer whose output gradient is `t`."""
    forced = os.environ.get("PAB_PSG_BACKEND")
    if forced == "host":
        return HostPath
    if forced == "device":
        return DevicePath
    if forced == "triton" or (t.is_cuda and param_dtype != torch.float64):
        kernels = _triton()
        if kernels and kernels.usable():
            return kernels.TritonPath
        return DevicePath
    if t.device.type == "cpu":
        return HostPath
    return DevicePath


# ---------------------------------------------------------------------------- the registered ops
def _config(msb_bits: int, msb_bits_grad: int, threshold: float, relative: bool, sparsify: bool, take_sign: bool) -> PsgConfig:
    return PsgConfig(msb_bits=msb_bits, msb_bits_grad=msb_bits_grad, threshold=threshold,
                     threshold_mode="relative" if relative else "absolute", sparsify=sparsify, take_sign=take_sign)


def _config_args(cfg: PsgConfig) -> tuple:
    return (cfg.msb_bits, cfg.msb_bits_grad, float(cfg.threshold), cfg.threshold_mode == "relative", cfg.sparsify, cfg.take_sign)


def _weight_grad(msb_product: Callable, grad_out, x, weight, full_grad, counts, cfg: PsgConfig, out_dtype) -> torch.Tensor:
    """Quantise x and g, take their weight-gradient product, threshold it; in `weight`'s layout."""
    path = path_for(grad_out, out_dtype)
    xq, gq = path.quantize(x, grad_out, cfg)
    msb_grad = msb_product(xq, gq)
    del xq, gq  # gone before the threshold's temporaries are made
    out = path.combine(msb_grad, full_grad, cfg, counts, out_dtype)
    if any(a != b for a, b, n in zip(out.stride(), weight.stride(), weight.shape) if n > 1):
        out = torch.empty_like(weight, dtype=out_dtype).copy_(out)  # the layout the fake implementation promises
    return out


def conv2d_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, full_grad: Optional[torch.Tensor],
                       counts: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int], groups: int,
                       msb_bits: int, msb_bits_grad: int, threshold: float, relative: bool, sparsify: bool, take_sign: bool,
                       out_dtype: torch.dtype) -> torch.Tensor:
    """PSG's weight gradient of `F.conv2d(x, weight, ...)` for the output gradient `grad_out`, in
    `out_dtype`; adds its kept and total entries to `counts` (`pab::psg_conv2d_weight_grad`)."""
    def msb_product(xq, gq):
        return torch.ops.aten.convolution_backward(gq, xq, weight, None, stride, padding, dilation, False, [0, 0], groups,
                                                   [False, True, False])[1]

    cfg = _config(msb_bits, msb_bits_grad, threshold, relative, sparsify, take_sign)
    return _weight_grad(msb_product, grad_out, x, weight, full_grad, counts, cfg, out_dtype)


def linear_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, full_grad: Optional[torch.Tensor],
                       counts: torch.Tensor, msb_bits: int, msb_bits_grad: int, threshold: float, relative: bool,
                       sparsify: bool, take_sign: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """PSG's weight gradient of `F.linear(x, weight)` for the output gradient `grad_out`, in
    `out_dtype`; adds its kept and total entries to `counts` (`pab::psg_linear_weight_grad`)."""
    def msb_product(xq, gq):
        return gq.reshape(-1, gq.shape[-1]).t() @ xq.reshape(-1, weight.shape[1])

    cfg = _config(msb_bits, msb_bits_grad, threshold, relative, sparsify, take_sign)
    return _weight_grad(msb_product, grad_out, x, weight, full_grad, counts, cfg, out_dtype)


def _fake_weight_grad(grad_out, x, weight, full_grad, counts, *args):
    """What the compiler needs to know of either op's output: the weight's shape and layout, in out_dtype."""
    return torch.empty_like(weight, dtype=args[-1])


def _register(name: str, impl: Callable) -> Callable:
    """`impl` as the operator pab::NAME (mutating `counts`), with its fake implementation; `impl`
    itself where torch has no `torch.library.custom_op` (before 2.4: eager only)."""
    if not hasattr(torch.library, "custom_op"):
        return impl
    op = torch.library.custom_op(f"pab::{name}", impl, mutates_args=("counts",))
    op.register_fake(_fake_weight_grad)
    return op


conv2d_weight_grad_op = _register("psg_conv2d_weight_grad", conv2d_weight_grad)
linear_weight_grad_op = _register("psg_linear_weight_grad", linear_weight_grad)


# ---------------------------------------------------------------------------- autocast
def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts F.conv2d / F.linear inputs to here, or None outside autocast."""
    if not _AUTOCAST_BY_DEVICE:  # torch < 2.4
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        return None
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


_AUTOCAST_BY_DEVICE = hasattr(torch, "get_autocast_dtype")


def _cast(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """Autocast's cast: floating tensors other than float64 go to `dtype`."""
    if dtype is None or t is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


# ---------------------------------------------------------------------------- autograd
def _conv_backward(g, x, w, conv, mask):
    """The plain layer's convolution_backward for the outputs in `mask` (the others None)."""
    if not any(mask):
        return None, None, None
    stride, padding, dilation, groups = conv
    outs = torch.ops.aten.convolution_backward(g, x, w, [w.shape[0]] if mask[2] else None, stride, padding, dilation,
                                               False, [0, 0], groups, list(mask))
    return tuple(o if m else None for o, m in zip(outs, mask))


def _to(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


class _PsgConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, counts, conv: tuple, cfg: PsgConfig):
        dt = _autocast_dtype(x.device.type)
        xc, wc, bc = _cast(x, dt), _cast(weight, dt), _cast(bias, dt)
        ctx.save_for_backward(xc, wc)
        ctx.counts, ctx.conv, ctx.cfg = counts, conv, cfg
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return F.conv2d(xc, wc, bc, *conv)

    @staticmethod
    def backward(ctx, g):
        xc, wc = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and b_dtype is not None
        full = need_w and not ctx.cfg.sparsify
        gx = gb = gw = full_grad = None
        if full or not need_w:  # the input, full-precision weight and bias gradients in one call
            gx, full_grad, gb = _conv_backward(g, xc, wc, ctx.conv, (need_x, full, need_b))
        if need_w:  # the quantised copies are made and gone before the input gradient is made
            stride, padding, dilation, groups = ctx.conv
            gw = conv2d_weight_grad_op(g, xc, wc, full_grad, ctx.counts, list(stride), list(padding), list(dilation), groups,
                                        *_config_args(ctx.cfg), w_dtype)
            if not full:
                gx, _, gb = _conv_backward(g, xc, wc, ctx.conv, (need_x, False, need_b))
        return _to(gx, x_dtype), gw, _to(gb, b_dtype), None, None, None


class _PsgLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, counts, cfg: PsgConfig):
        dt = _autocast_dtype(x.device.type)
        xc, wc, bc = _cast(x, dt), _cast(weight, dt), _cast(bias, dt)
        ctx.save_for_backward(xc, wc)
        ctx.counts, ctx.cfg = counts, cfg
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return F.linear(xc, wc, bc)

    @staticmethod
    def backward(ctx, g):
        xc, wc = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gb = gw = None
        g2 = g.reshape(-1, g.shape[-1])
        if need_w:
            full_grad = None if ctx.cfg.sparsify else g2.t() @ xc.reshape(-1, wc.shape[1])
            gw = linear_weight_grad_op(g, xc, wc, full_grad, ctx.counts, *_config_args(ctx.cfg), w_dtype)
        if need_x:
            gx = _to(g @ wc, x_dtype)
        if need_b and b_dtype is not None:
            gb = _to(g2.sum(0), b_dtype)
        return gx, gw, gb, None, None


def _wants_weight_grad(weight: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and weight.requires_grad


def psg_conv2d(x, weight, bias, stride, padding, dilation, groups, cfg: PsgConfig, counts: Optional[torch.Tensor] = None):
    """`F.conv2d` whose weight gradient is PSG's, its kept/total entries added to `counts` (an
    int64 pair on x's device); the plain conv when no weight gradient is wanted."""
    if not _wants_weight_grad(weight):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if counts is None:
        counts = torch.zeros(2, dtype=torch.int64, device=x.device)
    return _PsgConv2d.apply(x, weight, bias, counts, (stride, padding, dilation, groups), cfg)


def psg_linear(x, weight, bias, cfg: PsgConfig, counts: Optional[torch.Tensor] = None):
    """`F.linear` whose weight gradient is PSG's, its kept/total entries added to `counts` (an
    int64 pair on x's device); the plain linear when no weight gradient is wanted."""
    if not _wants_weight_grad(weight):
        return F.linear(x, weight, bias)
    if counts is None:
        counts = torch.zeros(2, dtype=torch.int64, device=x.device)
    return _PsgLinear.apply(x, weight, bias, counts, cfg)
