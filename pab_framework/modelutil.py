"""Model helpers shared by stages and pruners: building with a seed, initialisation, prunable weights."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .errors import PabError

PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)


def prunable_parameters(model: nn.Module, bias: bool = False, batchnorm: bool = False) -> dict[str, nn.Parameter]:
    """Weights of Conv2d and Linear layers (with `batchnorm`, BatchNorm weights too; with `bias`,
    those layers' biases too), by parameter name, in module order."""
    out: dict[str, nn.Parameter] = {}
    types = PRUNABLE_TYPES + ((nn.modules.batchnorm._BatchNorm,) if batchnorm else ())
    for mname, module in model.named_modules():
        if not isinstance(module, types):
            continue
        for pname in ("weight", "bias") if bias else ("weight",):
            p = getattr(module, pname, None)
            if isinstance(p, nn.Parameter):
                out[f"{mname}.{pname}" if mname else pname] = p
    return out


def classifier_name(model: nn.Module, num_classes: int) -> str | None:
    """The final classifier's weight: the last Linear weight with `num_classes` outputs."""
    found = None
    for mname, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            found = f"{mname}.weight" if mname else "weight"
    return found


def init_weight_(weight: torch.Tensor, method: str) -> None:
    """Re-draw one weight tensor. fan-in and ReLU gain, as the original PaB code."""
    if method == "default":
        return
    with torch.no_grad():
        if method == "kaiming_normal":
            nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu")
        elif method == "kaiming_uniform":
            nn.init.kaiming_uniform_(weight, mode="fan_in", nonlinearity="relu")
        elif method == "kaiming_constant_signed":
            fan = nn.init._calculate_correct_fan(weight, "fan_in")
            std = nn.init.calculate_gain("relu") / math.sqrt(fan)
            # sign of a fresh normal draw: +-std with equal probability, never 0
            sign = torch.where(torch.randn_like(weight) >= 0, 1.0, -1.0).to(weight.dtype)
            weight.copy_(sign * std)
        else:  # pragma: no cover - the spec's Literal rejects anything else
            raise ValueError(f"unknown init method {method!r}")


def initialise(model: nn.Module, method: str, scope: str) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d) or (scope == "all" and isinstance(module, nn.Linear)):
            init_weight_(module.weight, method)


def build_model(call, info, seed: int) -> nn.Module:
    """The model a spec's `model:` section describes for data `info` (a DataInfo), initialised as
    it says, drawn from `seed`: the same weights for the same seed on every run and rank. The
    global RNG is left as it was. The one place models are built (stages, report, re-init)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = call.plugin.build(call.params, info.num_classes, tuple(info.input_shape))
        initialise(model, call.init, call.init_scope)
    if not call.batchnorm_affine:
        drop_batchnorm_affine_(model, call.name)
    return model


def drop_batchnorm_affine_(model: nn.Module, name: str = "model") -> None:
    """Every BatchNorm layer of `model` without learned scale and shift (affine=False), in place."""
    found = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.affine = False
            m.register_parameter("weight", None)
            m.register_parameter("bias", None)
            found += 1
    if not found:
        raise PabError(f"model.batchnorm_affine: false, but the model {name!r} has no BatchNorm layer")


def apply_masks_(params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place (one multi-tensor op)."""
    names = [n for n in masks if n in params]
    if not names:
        return
    with torch.no_grad():
        ps = [params[n].data for n in names]
        ms = [masks[n].to(device=ps[i].device, dtype=ps[i].dtype) for i, n in enumerate(names)]
        torch._foreach_mul_(ps, ms)


def density_of(masks: dict[str, torch.Tensor]) -> tuple[int, int]:
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return kept, total
