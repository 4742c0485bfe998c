"""PSG's quantiser and threshold in aten ops: the definition every path computes (docs/psg.md).

`HostPath` serves CPU tensors: it reads the few scalars it needs (ranges, the threshold, the kept
count) to Python, which costs nothing without a device, and so needs the fewest ops. `DevicePath`
serves any other device with the scalars kept on the device (no host read, more launches). Both
take the layer input x and output gradient g (`quantize`) and then the low-precision weight
gradient g_msb (`combine`: threshold, fill, sign, cast, count), and agree bitwise.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

INF = float("inf")


@dataclass(frozen=True)
class PsgConfig:
    """PSG's settings (the plugin's Params without the field the gradient does not use)."""

    msb_bits: int = 8
    msb_bits_weight: int = 8
    msb_bits_grad: int = 16
    threshold: float = 1e-7
    threshold_mode: str = "relative"  # relative | absolute
    sparsify: bool = True
    take_sign: bool = False


def sample_rows(x: torch.Tensor) -> torch.Tensor:
    """x as (samples, rest) with a sample per row, a view for contiguous and channels_last x."""
    if x.dim() <= 1:
        return x.reshape(1, -1)
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    return x.reshape(x.shape[0], -1)


def to_f32(v: float) -> float:
    """v rounded to float32 (to nearest even; overflow to inf)."""
    try:
        return struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:
        return math.copysign(INF, v)


def f32_below(v: float) -> float:
    """The largest float32 below a positive float32 v."""
    (bits,) = struct.unpack("<I", struct.pack("<f", v))
    return struct.unpack("<f", struct.pack("<I", bits - 1))[0]


def combine_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the threshold is applied in: float64 for float64 parameters, else float32."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def input_scale(mins: list[float], maxs: list[float], bits: int) -> tuple[float, int]:
    """(D, z) of the input quantiser from each sample's min and max."""
    total = 0.0
    for lo, hi in zip(mins, maxs):
        if lo != lo or hi != hi:  # NaN
            total = math.nan
            break
        total += hi if hi >= -lo else -lo
    signed = min(mins) < 0
    step = to_f32(total / len(mins) * (2.0 if signed else 1.0) / 2**bits)
    return (step if step != 0 else 1.0), (2 ** (bits - 1) if signed else 0)


def grad_scale(grad_absmax: float, bits: int) -> float:
    """D of the output-gradient quantiser from max|g|."""
    step = to_f32(grad_absmax * 2.0 / 2**bits)
    return step if step != 0 else 1.0


def add_on_host(counts: torch.Tensor, kept: int, total: int) -> None:
    """counts (an int64 [kept, total] pair) += (kept, total): written in host memory when it lives
    there (no kernel), else by a copy (the host path forced onto another device's tensors)."""
    if counts.device.type != "cpu":
        counts.add_(torch.tensor([kept, total], dtype=counts.dtype).to(counts.device))
        return
    pair = counts.numpy()
    pair[0] += kept
    pair[1] += total


_ZERO_POINTS: dict[int, torch.Tensor] = {}  # the int32 zero points of the fake-quantise calls, made once
_DEVICE_CONSTANTS: dict = {}  # small constant tensors per (value, dtype, device), made once


class HostPath:
    """CPU tensors: the scalars are read to Python."""

    name = "host"

    @staticmethod
    def absmax(t: torch.Tensor) -> float:
        lo, hi = torch.aminmax(t)  # (vectorised on the CPU, unlike linalg.vector_norm(ord=inf))
        lo, hi = lo.tolist(), hi.tolist()
        return math.nan if lo != lo or hi != hi else max(hi, -lo)

    @staticmethod
    def fake_quantize(t: torch.Tensor, step: float, zero_point: int, bits: int) -> torch.Tensor:
        """fake_quantize_per_tensor_affine(t, step, zero_point, 0, 2^bits - 1), computed by the
        per-channel op with the same scale for every channel (the same arithmetic, faster on a CPU)."""
        zp = _ZERO_POINTS.get(zero_point)
        if zp is None:
            zp = _ZERO_POINTS[zero_point] = torch.tensor([zero_point], dtype=torch.int32)
        n = t.shape[0]
        return torch.fake_quantize_per_channel_affine(t, torch.tensor([step]).expand(n), zp.expand(n), 0, 0, 2**bits - 1)

    @classmethod
    def quantize(cls, x: torch.Tensor, g: torch.Tensor, cfg: PsgConfig) -> tuple[torch.Tensor, torch.Tensor]:
        rows = sample_rows(x)  # (amax and amin along a dim are vectorised on the CPU; aminmax along a dim is not)
        step_x, zp_x = input_scale(rows.amin(1).tolist(), rows.amax(1).tolist(), cfg.msb_bits)
        bits = cfg.msb_bits_grad
        step_g, zp_g = grad_scale(cls.absmax(g), bits), 2 ** (bits - 1)
        if x.dtype == g.dtype == torch.float32 and cfg.sparsify and not cfg.take_sign:
            # the fake-quantise arithmetic in five vectorised passes over both tensors at once (the
            # fake-quantise kernels are scalar loops on a CPU); the other settings spend their few
            # extra ops elsewhere and take the two fake-quantise calls (docs/psg.md, op counts)
            q = torch._foreach_mul([x, g], [to_f32(1.0 / step_x), to_f32(1.0 / step_g)])  # v * (1/D), a float32 product
            torch._foreach_round_(q)  # to nearest, ties to even
            torch._foreach_clamp_min_(q, [-zp_x, -zp_g])
            torch._foreach_clamp_max_(q, [2**cfg.msb_bits - 1 - zp_x, 2**bits - 1 - zp_g])
            torch._foreach_mul_(q, [step_x, step_g])  # (q - z) * D
            return q[0], q[1]
        xq = cls.fake_quantize(x.reshape(1, -1) if x.dim() < 2 else x, step_x, zp_x, cfg.msb_bits).view_as(x)
        gq = cls.fake_quantize(g.reshape(1, -1) if g.dim() < 2 else g, step_g, zp_g, bits).view_as(g)
        return xq, gq

    @classmethod
    def combine(cls, msb_grad: torch.Tensor, full_grad: torch.Tensor | None, cfg: PsgConfig, counts: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
        dtype = combine_dtype(out_dtype)
        grad = msb_grad.to(dtype)  # written in place from here
        if cfg.threshold_mode == "relative":
            top = cls.absmax(grad)
            thr = top * cfg.threshold if dtype == torch.float64 else to_f32(to_f32(cfg.threshold) * top)
        else:
            thr = cfg.threshold if dtype == torch.float64 else to_f32(cfg.threshold)
        n = grad.numel()
        if not thr > 0:  # 0 or NaN: nothing is dropped
            out, kept = (grad.sign() if cfg.take_sign else grad), n
        else:
            below = math.nextafter(thr, 0.0) if dtype == torch.float64 else f32_below(thr)  # the largest float < thr
            out = torch.ops.aten.hardshrink.out(grad, below, out=grad)  # 0 where |grad| <= below, i.e. < thr: the dropped entries
            kept = torch.count_nonzero(out).tolist()  # the kept entries are exactly the nonzero ones (|grad| >= thr > 0)
            if not cfg.sparsify:
                out = torch.where(out == 0, full_grad, out)  # (promotes a bf16 full_grad itself)
            if cfg.take_sign:
                out = out.sign_()
        add_on_host(counts, kept, n)
        return out.to(out_dtype)


def device_constant(value, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (value, dtype, device)
    t = _DEVICE_CONSTANTS.get(key)
    if t is None:
        t = _DEVICE_CONSTANTS[key] = torch.full((1,), value, dtype=dtype, device=device)
    return t


class DevicePath:
    """Any device: the scalars stay on the device (no host read)."""

    name = "device"

    @staticmethod
    def fake_quantize(v: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
        one = device_constant(1, torch.long, v.device)
        return torch._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(v, scale, zero_point, one, 0, 2**bits - 1)[0]

    @classmethod
    def quantize(cls, x: torch.Tensor, g: torch.Tensor, cfg: PsgConfig) -> tuple[torch.Tensor, torch.Tensor]:
        bits = cfg.msb_bits
        mins, maxs = torch.aminmax(sample_rows(x), dim=1)
        mean_absmax = torch.maximum(maxs, mins.neg()).double().mean()
        signed = mins.amin() < 0
        step_x = (mean_absmax * torch.where(signed, 2.0, 1.0) / 2**bits).float().reshape(1)
        step_x = torch.where(step_x == 0, 1.0, step_x)
        zp_x = (signed.to(torch.int32) * 2 ** (bits - 1)).reshape(1)
        xq = cls.fake_quantize(x, step_x, zp_x, bits)
        bits_g = cfg.msb_bits_grad
        step_g = (torch.linalg.vector_norm(g, INF).float() * (2.0 / 2**bits_g)).reshape(1)
        step_g = torch.where(step_g == 0, 1.0, step_g)
        gq = cls.fake_quantize(g, step_g, device_constant(2 ** (bits_g - 1), torch.int32, g.device), bits_g)
        return xq, gq

    @staticmethod
    def combine(msb_grad: torch.Tensor, full_grad: torch.Tensor | None, cfg: PsgConfig, counts: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
        r = msb_grad.to(combine_dtype(out_dtype))
        thr = torch.linalg.vector_norm(r, INF) * cfg.threshold if cfg.threshold_mode == "relative" else cfg.threshold
        drop = r.abs() < thr  # NaN entries and a NaN threshold drop nothing
        out = torch.where(drop, 0.0 if full_grad is None else full_grad.to(r.dtype), r)
        if cfg.take_sign:
            out = out.sign_()
        counts.add_(r.numel())  # kept and total += n, then kept -= the dropped entries
        counts[:1].sub_(drop.sum())
        return out.to(out_dtype)
