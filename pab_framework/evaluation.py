"""Loss and accuracy: the running sums a training epoch and an evaluation keep, and `evaluate`.

The sums stay on the device while batches go by (adding never waits for it); reading them is one
host transfer, after one all-reduce under DDP (`RunningSums.reduced`), so every rank reports the
figures of the whole split.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RunningSums:
    """The loss sum, the correct predictions and the examples seen, on `device`."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.seen = 0

    def add(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor, weight: int = 1) -> None:
        """Add a batch: its loss times `weight` (a mean loss times the batch size is the batch's
        sum: one multiply-add), its correct predictions and its size."""
        self.loss_sum.add_(loss, alpha=weight)
        self.correct += (out.argmax(1) == y).sum()
        self.seen += y.numel()

    def reduced(self, dist=None) -> torch.Tensor:
        """(loss sum, correct, seen) as one float64 vector, summed over every rank when `dist` is
        enabled (a collective: every rank calls it at the same point)."""
        t = torch.stack([self.loss_sum.double(), self.correct.double(),
                         torch.tensor(float(self.seen), dtype=torch.float64, device=self.loss_sum.device)])
        return dist.sum_(t) if dist is not None else t

    def totals(self, dist=None) -> tuple[float, int, int]:
        """`reduced(dist)` read to the host: (loss sum, correct, seen)."""
        loss_sum, correct, seen = self.reduced(dist).tolist()
        return loss_sum, int(correct), int(seen)


@torch.no_grad()
def evaluate(model: nn.Module, batches, dist=None) -> dict:
    """Validation loss and accuracy (fractions), with one host sync at the end. Under DDP (`dist`
    enabled, `batches` sharded) the sums are all-reduced, so every rank reports the whole split."""
    was_training = model.training
    model.eval()
    sums = RunningSums(next((q.device for q in model.parameters()), torch.device("cpu")))
    for x, y in batches:
        out = model(x)
        sums.add(F.cross_entropy(out, y, reduction="sum"), out, y)
    model.train(was_training)
    loss_sum, correct, n = sums.totals(dist)
    if n == 0:
        return {"val_loss": float("nan"), "val_acc": 0.0, "val_n": 0}
    return {"val_loss": loss_sum / n, "val_acc": correct / n, "val_n": n}
