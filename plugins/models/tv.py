"""Any torchvision classification model by name (`resnet50`, `vgg16_bn`, ...), untrained."""
from __future__ import annotations

import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, field_validator


def _classification_models() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


class Torchvision:
    """`name: torchvision` with `arch:`; also registered under common names (`resnet50`, ...)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        arch: str = Field(..., description="A torchvision classification model, e.g. resnet50.")

        @field_validator("arch")
        @classmethod
        def _known(cls, v: str) -> str:
            known = _classification_models()
            if v not in known:
                import difflib

                close = difflib.get_close_matches(v, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"{v!r} is not a torchvision classification model{hint}")
            return v

    def build(self, params, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        import torchvision.models as tvm

        return tvm.get_model(params.arch, weights=None, num_classes=num_classes)


class NamedTorchvision:
    """One torchvision architecture under its own plugin name (no parameters)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, arch: str):
        self.arch = arch
        self.__doc__ = f"torchvision `{arch}`, randomly initialised."

    def build(self, params, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        import torchvision.models as tvm

        return tvm.get_model(self.arch, weights=None, num_classes=num_classes)


resnet18 = NamedTorchvision("resnet18")
resnet34 = NamedTorchvision("resnet34")
resnet50 = NamedTorchvision("resnet50")
resnet101 = NamedTorchvision("resnet101")
wide_resnet50_2 = NamedTorchvision("wide_resnet50_2")
vgg16_bn = NamedTorchvision("vgg16_bn")
mobilenet_v2 = NamedTorchvision("mobilenet_v2")
