"""Bool tensors as packed bits (8 to a byte, first element in the highest bit), with torch ops only."""
from __future__ import annotations

import torch

_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack(b: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 tensor of ceil(n / 8) bytes holding the n elements of bool tensor `b` (flattened)."""
    flat = b.detach().reshape(-1).to("cpu", torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _WEIGHTS).sum(1, dtype=torch.int32).to(torch.uint8)


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first `n` bits of `packed` as a 1-D bool tensor; a ValueError when it holds too few."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n + 7) // 8:
        raise ValueError(f"expected {(n + 7) // 8} bytes of packed bits for {n} entries, found {packed.numel()} ({packed.dtype})")
    return (packed.unsqueeze(1) & _WEIGHTS).ne(0).reshape(-1)[:n]
