"""Batches for training and evaluation.

Datasets small enough to hold as tensors (`torch.utils.data.TensorDataset`, the embedded digits)
are batched by indexing on the device, with no DataLoader overhead; everything else goes through
a DataLoader. The order of every epoch is a function of (seed, epoch) alone.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about the data: classes, input shape, normalisation."""

    num_classes: int
    input_shape: tuple[int, ...]  # (C, H, W) or (features,)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


class Batches:
    """An epoch-aware iterable of (inputs, targets) on `device`."""

    def __init__(self, dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, device: torch.device,
                 num_workers: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1, pad: bool = True,
                 pin_memory: bool | None = None, persistent_workers: bool | None = None, prefetch_factor: int | None = None,
                 channels_last: bool = False):
        """Under DDP (`world_size` > 1) each rank gets every `world_size`-th example of the epoch's
        order. `pad` (training) repeats examples so that every rank has as many batches, as
        DistributedSampler does; without it (evaluation) every example is seen exactly once."""
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.device = device
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.pad = pad
        self.channels_last = channels_last
        self.epoch = 0
        self.skip = 0
        self._tensors = None
        if isinstance(dataset, TensorDataset):
            self._tensors = tuple(t.to(device) for t in dataset.tensors)
            self.loader = None
        else:
            self.sampler = None
            if world_size > 1 and pad:
                self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
            elif world_size > 1:
                self.sampler = _Shard(len(dataset), rank, world_size)
            g = torch.Generator()
            g.manual_seed(seed)
            self._generator = g
            extra = {"prefetch_factor": prefetch_factor} if num_workers > 0 and prefetch_factor else {}
            self.loader = DataLoader(
                dataset,
                batch_size=batch_size,
                shuffle=shuffle and self.sampler is None,
                sampler=self.sampler,
                num_workers=num_workers,
                pin_memory=device.type == "cuda" if pin_memory is None else pin_memory,
                drop_last=drop_last,
                generator=g,
                persistent_workers=num_workers > 0 if persistent_workers is None else (persistent_workers and num_workers > 0),
                **extra,
            )

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Iterate epoch `epoch` next, leaving out its first `skip` batches (a mid-epoch resume)."""
        self.epoch = epoch
        self.skip = skip
        if self.loader is not None:
            if self.sampler is not None:
                self.sampler.set_epoch(epoch)
            self._generator.manual_seed(self.seed * 1_000_003 + epoch)

    def _indices(self) -> torch.Tensor:
        n = len(self._tensors[0])
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed * 1_000_003 + self.epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        if self.world_size > 1 and not self.pad:
            return idx[self.rank :: self.world_size].to(self._tensors[0].device)
        if self.world_size > 1:
            per = n // self.world_size if self.drop_last else -(-n // self.world_size)
            if not self.drop_last and per * self.world_size > n:  # pad by wrapping, as DistributedSampler
                idx = torch.cat([idx, idx[: per * self.world_size - n]])
            idx = idx[self.rank : per * self.world_size : self.world_size]
        return idx.to(self._tensors[0].device)

    def __len__(self) -> int:
        if self.loader is not None:
            return len(self.loader)
        n = len(self._indices()) if self.world_size > 1 else len(self._tensors[0])
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self._batches():
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.loader is not None:
            nb = self.device.type == "cuda"
            # skipped batches are still loaded: with workers and random augmentation, only the
            # same iterator gives the remaining batches exactly as an uninterrupted epoch would
            for x, y in itertools.islice(self.loader, self.skip, None):
                yield x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb)
            return
        idx = self._indices()
        n = len(idx)
        stop = n - n % self.batch_size if self.drop_last else n
        for i in range(self.skip * self.batch_size, stop, self.batch_size):
            j = idx[i : i + self.batch_size]
            yield tuple(t.index_select(0, j) for t in self._tensors)


class _Shard(torch.utils.data.Sampler):
    """Every `world_size`-th index from `rank`, in order, none repeated (evaluation under DDP)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))

    def set_epoch(self, epoch: int) -> None:  # the same shard every epoch
        pass
