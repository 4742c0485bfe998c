"""Small models for the embedded digits data: an MLP and a little CNN."""
from __future__ import annotations

import math

import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field


class MLP:
    """Fully connected ReLU network on flattened inputs."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        hidden: list[int] = Field([256, 256], min_length=1, description="Width of each hidden layer.")
        batchnorm: bool = Field(True, description="BatchNorm after each hidden layer.")

    def build(self, params: "MLP.Params", num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in params.hidden:
            layers.append(nn.Linear(width, h, bias=not params.batchnorm))
            if params.batchnorm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU(inplace=True))
            width = h
        layers.append(nn.Linear(width, num_classes))
        return nn.Sequential(*layers)


class DigitsCNN:
    """A small VGG-like CNN for 8x8 images (the embedded digits): conv-BN-ReLU blocks, one pooling."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        width: int = Field(64, ge=1, le=4096, description="Channels of the first block; the second has twice as many.")

    def build(self, params: "DigitsCNN.Params", num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        c = input_shape[0] if len(input_shape) == 3 else 1
        w = params.width

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        return nn.Sequential(
            *block(c, w),
            *block(w, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * w, num_classes),
        )
