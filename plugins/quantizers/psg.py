"""`psg`: Predictive Sign Gradient low-precision weight gradients for any model.

`apply` turns every prunable `nn.Conv2d` and `nn.Linear` (the layers whose weights carry masks)
into its PSG form in place: the module keeps its parameters, buffers and state_dict keys (so the
masks, checkpoints and the saved model.pt load into the plain architecture), and only its
forward changes, to `psg_ops`' functions (whose weight gradient is a registered operator, so a
compiled model stays one graph). Everything else is left alone.

Mixed precision: under `runtime.amp` the layers compute their forward in the autocast dtype as
the plain layers would, and the weight gradients come back in the parameters' dtype. With
`amp: fp16` the gradients PSG sees are multiplied by the loss scaler's changing factor, so an
absolute threshold or `take_sign` cannot mean what they say: `pab validate` refuses those two
with fp16 (`spec_problems`).
"""
from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from pab_framework.callbacks import Callback
from pab_framework.transforms import TransformContext

from .psg_ops import PsgConfig, PsgStats, psg_conv2d, psg_linear

log = logging.getLogger(__name__)


class PsgConv2d(nn.Conv2d):
    """An nn.Conv2d whose weight gradient is PSG's; made from an existing Conv2d by `PSG.apply`."""

    psg: PsgConfig
    psg_stats: PsgStats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        return psg_conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups, self.psg,
                          self.psg_stats.counts_on(x.device))


class PsgLinear(nn.Linear):
    """An nn.Linear whose weight gradient is PSG's; made from an existing Linear by `PSG.apply`."""

    psg: PsgConfig
    psg_stats: PsgStats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return psg_linear(x, self.weight, self.bias, self.psg, self.psg_stats.counts_on(x.device))


class PSG:
    """PSG weight gradients for the prunable Conv2d and Linear layers of any model."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        msb_bits: int = Field(8, ge=2, le=16, description="Bits of the layer input used for the weight gradient.")
        msb_bits_weight: int = Field(
            8, ge=2, le=32, json_schema_extra={"key": False}, description="Bits of the weight in the predictive forward branch (kept for fidelity: PaB's "
            "setting has no predictive forward, so it changes no gradient).")
        msb_bits_grad: int = Field(16, ge=2, le=24, description="Bits of the output gradient used for the weight gradient.")
        threshold: float = Field(1e-7, ge=0, description="Keep the low-precision weight gradient where its magnitude is at least this (see threshold_mode).")
        threshold_mode: Literal["relative", "absolute"] = Field(
            "relative", description="`relative`: the threshold is `threshold` x the layer's largest |gradient| (the seed's "
            "CIFAR runs); `absolute`: `threshold` itself (the seed's ImageNet runs). The original CLI chose between them "
            "by the sign of its flag.")
        sparsify: bool = Field(True, description="Below the threshold the gradient is 0 (true) or the full-precision gradient (false).")
        take_sign: bool = Field(False, description="Replace the weight gradient by its sign.")

    def spec_problems(self, params: "PSG.Params", spec) -> list[tuple[tuple, str]]:
        """Settings that cannot work with the rest of the spec (the framework reports them with
        their file, line and key)."""
        out = []
        if spec.runtime.amp == "fp16":
            scaled = ("with runtime.amp: fp16 every gradient reaching PSG is multiplied by the loss scaler's "
                      "changing factor")
            if params.threshold_mode == "absolute":
                out.append((("threshold_mode",), f"'absolute' compares the weight gradient with a fixed number, but {scaled}; "
                            "use threshold_mode: relative (unaffected by the factor) or runtime.amp: bf16"))
            if params.take_sign:
                out.append((("take_sign",), "true makes every weight gradient +-1, which the fp16 loss scaler then "
                            "divides by its changing factor, so the optimizer would see +-1/scale; use runtime.amp: bf16 or none"))
        return out

    def apply(self, model: nn.Module, params: "PSG.Params", tctx: TransformContext) -> nn.Module:
        """Wrap the masked Conv2d/Linear layers of `model` in place; their kept fractions are
        recorded every epoch (`psg_kept` in metrics.jsonl, per layer in layers.jsonl)."""
        prunable = tctx.masked_names
        cfg = PsgConfig(**params.model_dump())
        wrapped = 0
        for name, m in model.named_modules():
            wname = f"{name}.weight" if name else "weight"
            if wname not in prunable:
                continue
            if type(m) is nn.Conv2d and not isinstance(m.padding, str):
                m.__class__ = PsgConv2d
            elif type(m) is nn.Conv2d and m.padding == "valid":
                m.__class__ = PsgConv2d
                m.padding = (0, 0)
            elif type(m) is nn.Linear:
                m.__class__ = PsgLinear
            else:
                log.warning("psg: %s (%s) is left at full precision: only nn.Conv2d with numeric padding and nn.Linear are wrapped",
                            name, type(m).__name__)
                continue
            # the same object, its class swapped: parameters, buffers, hooks and keys stay as they were
            m.psg = cfg
            m.psg_stats = PsgStats(m.weight.device)
            wrapped += 1
        if prunable and not wrapped:
            log.warning("psg: no layer was wrapped")
        tctx.add_callback(PsgFigures(self, model))
        return model

    @staticmethod
    def layers(model: nn.Module) -> dict[str, nn.Module]:
        return {n: m for n, m in model.named_modules() if isinstance(m, (PsgConv2d, PsgLinear))}

    def stats(self, model: nn.Module) -> dict[str, dict]:
        """Per wrapped layer (by its weight's name, as the masks): kept and total weight-gradient entries since the last reset (one host sync)."""
        layers = self.layers(model)
        if not layers:
            return {}
        counts = [m.psg_stats.counts for m in layers.values()]
        pairs = torch.stack([c.to(counts[0].device) for c in counts]).tolist()
        return {f"{n}.weight": {"kept": kept, "total": total} for n, (kept, total) in zip(layers, pairs)}

    def reset_stats(self, model: nn.Module) -> None:
        for m in self.layers(model).values():
            m.psg_stats.reset()

    def epoch_figures(self, model: nn.Module) -> dict:
        """`psg_kept`: the kept fraction over all layers; `psg_kept_per_layer`: layer -> kept
        fraction, since the last call (which resets the counts)."""
        st = self.stats(model)
        self.reset_stats(model)
        if not st:
            return {}
        kept, total = sum(v["kept"] for v in st.values()), sum(v["total"] for v in st.values())
        return {"psg_kept": kept / total if total else 1.0,
                "psg_kept_per_layer": {n: (v["kept"] / v["total"] if v["total"] else 1.0) for n, v in st.items()}}


class PsgFigures(Callback):
    """Records PSG's kept fraction of weight-gradient entries every epoch: `psg_kept` (all layers)
    and, per layer, `psg_kept` in layers.jsonl."""

    def __init__(self, psg: PSG, model: nn.Module):
        self.psg, self.model = psg, model

    def record(self, trainer, sink) -> None:
        figs = self.psg.epoch_figures(self.model)
        if figs:
            sink.scalar("psg_kept", figs["psg_kept"])
            sink.layers({n: {"psg_kept": v} for n, v in figs["psg_kept_per_layer"].items()})
