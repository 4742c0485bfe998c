"""`synthetic`: generated inputs and labels, no files: for smoke-testing any recipe and for
measuring the framework without a disk or a decoder in the way.

Each split is generated once, seeded, as one tensor of inputs and one of labels (a
`TensorDataset`), so the framework keeps it on the device and batches it by indexing: no loader
workers, no decoding, no augmentation.

The labels are learnable, so a smoke test shows training working: every class has a mean pattern
(for images, a coarse 4x4 grid per channel blown up to H x W, the kind of structure convolutions
and global pooling pick up), and an example of class c is `signal` x pattern_c plus standard
normal noise. Classes are balanced. `signal: 0` makes inputs independent of the labels (pure
noise: nothing to learn, for throughput alone).

An image recipe switches to it by `data.name: synthetic` alone: `image_size` sets H = W of the
input shape, and the keys that only say where files are or how to decode and augment them
(`root`, `download`, `augment`, `resize`) are accepted and ignored.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.utils.data import TensorDataset

from pab_framework.data import DataInfo

MAX_BYTES = 16 << 30  # both splits' inputs together; they are generated in host memory first
_IGNORED = "Accepted so that an image recipe switches to synthetic data by data.name alone; ignored (synthetic data reads no files{})."


class Synthetic:
    """Seeded random inputs with learnable labels, generated in memory (no files)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        input_shape: list[int] = Field(
            [3, 32, 32], min_length=1, max_length=3,
            description="Shape of one input: (C, H, W) for images, (features,) for vectors.")
        image_size: Optional[int] = Field(None, ge=1, le=4096, description="Sets H = W of a (C, H, W) input_shape (as imagefolder's image_size).")
        num_classes: int = Field(10, ge=2, le=1_000_000, description="Number of classes (balanced).")
        train_size: int = Field(1024, ge=1, le=100_000_000, description="Training examples.")
        val_size: int = Field(256, ge=1, le=100_000_000, description="Validation examples.")
        signal: float = Field(
            1.0, ge=0, le=1e6,
            description="Scale of the class patterns against unit noise: larger is easier; 0 makes the labels unlearnable.")
        seed: int = Field(0, ge=0, le=2**32, description="Seed of the generated data (the spec's seed does not change it).")
        # keys of the cifar10/cifar100/imagefolder sections: they change nothing here, so they are
        # left out of the stage keys ("key": False) and of the resolved spec (exclude)
        root: Optional[str] = Field(None, exclude=True, json_schema_extra={"key": False}, description=_IGNORED.format(""))
        download: Optional[bool] = Field(None, exclude=True, json_schema_extra={"key": False}, description=_IGNORED.format(""))
        augment: Optional[bool] = Field(None, exclude=True, json_schema_extra={"key": False}, description=_IGNORED.format(" and is not augmented"))
        resize: Optional[int] = Field(None, exclude=True, json_schema_extra={"key": False}, description=_IGNORED.format("; no resizing: image_size is the size"))

        @model_validator(mode="after")
        def _check(self):
            if any(d < 1 for d in self.input_shape):
                raise ValueError(f"input_shape: every dimension must be >= 1 (got {self.input_shape})")
            if self.image_size is not None and len(self.input_shape) != 3:
                raise ValueError(f"image_size needs a (C, H, W) input_shape (got {self.input_shape})")
            per = math.prod(self.shape) * 4
            if (self.train_size + self.val_size) * per > MAX_BYTES:
                raise ValueError(
                    f"train_size + val_size = {self.train_size + self.val_size} inputs of shape {list(self.shape)} "
                    f"would take {(self.train_size + self.val_size) * per / 2**30:.1f} GiB (at most {MAX_BYTES >> 30} GiB)")
            return self

        @property
        def shape(self) -> tuple[int, ...]:
            s = tuple(self.input_shape)
            return (s[0], self.image_size, self.image_size) if self.image_size is not None else s

    def info(self, params: "Synthetic.Params", *, base_dir=None) -> DataInfo:
        c = params.shape[0] if len(params.shape) == 3 else 1
        return DataInfo(num_classes=params.num_classes, input_shape=params.shape, mean=(0.0,) * c, std=(1.0,) * c)

    def build(self, params: "Synthetic.Params", split: str, *, base_dir=None) -> TensorDataset:
        train = split == "train"
        x, y = _generate(params.shape, params.train_size if train else params.val_size, params.num_classes,
                         params.signal, params.seed, 0 if train else 1)
        return TensorDataset(x, y)


def patterns(shape: tuple[int, ...], num_classes: int, seed: int) -> torch.Tensor:
    """One mean pattern per class, (num_classes, *shape): images get a coarse 4x4 grid per channel
    blown up to H x W; other shapes, independent standard normal entries."""
    g = torch.Generator().manual_seed(3 * seed)
    if len(shape) == 3:
        c, h, w = shape
        coarse = torch.randn(num_classes, c, min(h, 4), min(w, 4), generator=g)
        return F.interpolate(coarse, size=(h, w), mode="nearest")
    return torch.randn(num_classes, *shape, generator=g)


@lru_cache(maxsize=2)  # one spec's train and val: built again by every stage, generated once
def _generate(shape: tuple[int, ...], n: int, num_classes: int, signal: float, seed: int, which: int):
    """n examples: balanced labels in a seeded order, inputs = signal x pattern[label] + noise.
    The tensors are shared by every build of the same split: treat them as read-only."""
    g = torch.Generator().manual_seed(3 * seed + 1 + which)  # each split its own noise; the patterns are shared
    y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    x = torch.randn((n, *shape), generator=g)
    if signal:
        means = patterns(shape, num_classes, seed)
        step = max(1, (64 << 20) // max(1, means[0].numel() * 4))  # bounded temporary: ~64 MiB at a time
        for i in range(0, n, step):
            x[i : i + step].add_(means[y[i : i + step]], alpha=signal)
    return x, y
