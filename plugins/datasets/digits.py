"""`digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes).

It ships inside scikit-learn, so the quickstart needs no download. The train/validation split is
fixed by `split_seed` (stratified), and pixels are normalised with the training split's mean/std.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import TensorDataset

from pab_framework.data import DataInfo


@lru_cache(maxsize=8)
def _split(val_fraction: float, split_seed: int):
    from sklearn.datasets import load_digits  # heavy: scikit-learn, only when the digits are loaded

    bunch = load_digits()
    x = bunch.images.astype(np.float32)  # (n, 8, 8), values 0..16
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(split_seed)
    val_idx = []
    for c in np.unique(y):  # stratified: every class keeps the same share in validation
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        val_idx.extend(idx[: int(round(len(idx) * val_fraction))])
    val = np.zeros(len(y), dtype=bool)
    val[np.array(val_idx, dtype=np.int64)] = True
    mean, std = float(x[~val].mean()), float(x[~val].std())
    x = (x - mean) / std
    xt = torch.from_numpy(x).unsqueeze(1)  # (n, 1, 8, 8)
    yt = torch.from_numpy(y)
    vt = torch.from_numpy(val)
    return (xt[~vt], yt[~vt]), (xt[vt], yt[vt]), (mean, std)


class Digits:
    """Handwritten digits from scikit-learn, embedded (no download)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        val_fraction: float = Field(0.2, gt=0, lt=1, description="Share of each class held out for validation.")
        split_seed: int = Field(0, ge=0, description="Seed of the fixed train/validation split.")

    def info(self, params: "Digits.Params", *, base_dir=None) -> DataInfo:
        _, _, (mean, std) = _split(params.val_fraction, params.split_seed)
        return DataInfo(num_classes=10, input_shape=(1, 8, 8), mean=(mean,), std=(std,))

    def build(self, params: "Digits.Params", split: str, *, base_dir=None) -> TensorDataset:
        train, val, _ = _split(params.val_fraction, params.split_seed)
        x, y = train if split == "train" else val
        return TensorDataset(x.clone(), y.clone())
