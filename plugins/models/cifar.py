"""`cifar_resnet18`: ResNet-18 with the CIFAR stem, the seed's main architecture."""
from __future__ import annotations

import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from .resnet_cifar import cifar_resnet18


class CifarResNet18:
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool (for 32x32 inputs)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        width: int = Field(64, ge=1, le=1024, description="Channels of the first stage (64 in the paper).")

    def build(self, params: "CifarResNet18.Params", num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        return cifar_resnet18(num_classes=num_classes, in_channels=input_shape[0], width=params.width)
