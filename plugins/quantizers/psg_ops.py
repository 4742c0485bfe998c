"""Predictive Sign Gradient (PSG, from E2-Train) for one Conv2d or Linear layer, as PaB runs it.

Forward: one full-precision conv/linear. Backward:
- input gradient at full precision (the plain layer's);
- weight gradient from low-precision copies: the input x quantised to `msb_bits`, the output
  gradient g quantised to `msb_bits_grad` (the max of |g| over the whole tensor), then one
  conv/linear weight-gradient op on them: g_msb;
- a threshold keeps g_msb where |g_msb| >= thr (thr = threshold x max|g_msb| when relative, the
  number itself when absolute); elsewhere 0 (`sparsify`) or the full-precision weight gradient;
  `take_sign` replaces the result by its sign.

The quantiser (both for x and g): range [lo, hi] = [-max, max] (signed) or [0, max] (x that is
non-negative, as after a ReLU: detected per call), delta = (hi - lo) / 2^bits,
code = round(clamp((x - lo) / delta, 0, 2^bits - 1)), value = code * delta + lo. Zeros stay zero
(0 maps to a code whose value is exactly 0, since delta is a power-of-two fraction of max). For x,
max is the per-sample max of |x| averaged over the batch.

Memory: the input is saved for backward as its integer codes (uint8 for up to 8 bits) plus two
scalars, not as float32; the full-precision input is kept only when `sparsify` is off (its
weight gradient is then needed). The weight quantisation (`msb_bits_weight`) only shapes the
predictive forward branch, which PaB does not use: it does not change any gradient here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight


@dataclass(frozen=True)
class PsgConfig:
    msb_bits: int = 8
    msb_bits_weight: int = 8
    msb_bits_grad: int = 16
    threshold: float = 1e-7
    threshold_mode: str = "relative"  # relative | absolute
    sparsify: bool = True
    take_sign: bool = False


def _code_dtype(bits: int) -> torch.dtype:
    return torch.uint8 if bits <= 8 else (torch.int16 if bits <= 15 else torch.int32)


def input_range(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, delta) for x: per-sample max|x| averaged over the batch; [0, max] if x >= 0 everywhere."""
    flat = x.detach().reshape(x.shape[0], -1) if x.dim() > 1 else x.detach().reshape(1, -1)
    mins, maxs = torch.aminmax(flat, dim=1)
    mx = torch.maximum(mins.abs(), maxs.abs()).mean()
    lo = torch.where(mins.min() < 0, -mx, torch.zeros_like(mx))
    delta = (mx - lo) / 2.0**bits
    return lo, torch.where(delta > 0, delta, torch.ones_like(delta))


def encode(x: torch.Tensor, lo: torch.Tensor, delta: torch.Tensor, bits: int) -> torch.Tensor:
    q = (x.detach() - lo).div_(delta).clamp_(0, 2.0**bits - 1).round_()
    return q.to(_code_dtype(bits))


def decode(codes: torch.Tensor, lo: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return codes.to(dtype).mul_(delta).add_(lo)


def quantize_signed_whole(g: torch.Tensor, bits: int) -> torch.Tensor:
    """g on [-max, max] with max = max|g| over the whole tensor, 2^bits levels, dequantised."""
    mx = g.detach().abs().amax()
    delta = 2 * mx / 2.0**bits
    delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    return (g + mx).div_(delta).clamp_(0, 2.0**bits - 1).round_().mul_(delta).sub_(mx)


def combine(g_msb: torch.Tensor, g_full, cfg: PsgConfig, stats) -> torch.Tensor:
    """Threshold g_msb (keep |g_msb| >= thr), fill the rest with 0 or g_full, take the sign if asked."""
    a = g_msb.abs()
    thr = cfg.threshold * a.amax() if cfg.threshold_mode == "relative" else cfg.threshold
    keep = a >= thr
    if stats is not None:
        stats[0] += keep.sum()
        stats[1] += keep.numel()
    out = torch.where(keep, g_msb, g_full if g_full is not None else torch.zeros((), dtype=g_msb.dtype, device=g_msb.device))
    return out.sign_() if cfg.take_sign else out


class _PsgConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, cfg: PsgConfig, stats):
        out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        lo, delta = input_range(x, cfg.msb_bits)
        codes = encode(x, lo, delta, cfg.msb_bits)
        keep_full = not cfg.sparsify
        ctx.save_for_backward(codes, lo, delta, weight, x if keep_full else None)
        ctx.conf = (stride, padding, dilation, groups, cfg, stats, x.shape, x.dtype, bias is not None)
        return out

    @staticmethod
    def backward(ctx, g):
        codes, lo, delta, weight, x_full = ctx.saved_tensors
        stride, padding, dilation, groups, cfg, stats, x_shape, x_dtype, has_bias = ctx.conf
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = conv2d_input(x_shape, weight, g, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            xq = decode(codes, lo, delta, x_dtype)
            gq = quantize_signed_whole(g, cfg.msb_bits_grad)
            g_msb = conv2d_weight(xq, weight.shape, gq, stride, padding, dilation, groups)
            g_full = conv2d_weight(x_full, weight.shape, g, stride, padding, dilation, groups) if x_full is not None else None
            gw = combine(g_msb, g_full, cfg, stats)
        if has_bias and ctx.needs_input_grad[2]:
            gb = g.sum((0, 2, 3))
        return gx, gw, gb, None, None, None, None, None, None


class _PsgLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, cfg: PsgConfig, stats):
        out = F.linear(x, weight, bias)
        lo, delta = input_range(x, cfg.msb_bits)
        codes = encode(x, lo, delta, cfg.msb_bits)
        ctx.save_for_backward(codes, lo, delta, weight, None if cfg.sparsify else x)
        ctx.conf = (cfg, stats, x.dtype, bias is not None)
        return out

    @staticmethod
    def backward(ctx, g):
        codes, lo, delta, weight, x_full = ctx.saved_tensors
        cfg, stats, x_dtype, has_bias = ctx.conf
        gx = gw = gb = None
        g2 = g.reshape(-1, g.shape[-1])
        if ctx.needs_input_grad[0]:
            gx = g @ weight
        if ctx.needs_input_grad[1]:
            xq = decode(codes, lo, delta, x_dtype).reshape(-1, weight.shape[1])
            gq = quantize_signed_whole(g2, cfg.msb_bits_grad)
            g_msb = gq.t() @ xq
            g_full = g2.t() @ x_full.reshape(-1, weight.shape[1]) if x_full is not None else None
            gw = combine(g_msb, g_full, cfg, stats)
        if has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb, None, None


def psg_conv2d(x, weight, bias, stride, padding, dilation, groups, cfg: PsgConfig, stats=None):
    return _PsgConv2d.apply(x, weight, bias, stride, padding, dilation, groups, cfg, stats)


def psg_linear(x, weight, bias, cfg: PsgConfig, stats=None):
    return _PsgLinear.apply(x, weight, bias, cfg, stats)
