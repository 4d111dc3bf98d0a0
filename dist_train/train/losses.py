"""Losses summed over the samples of a batch (the training loop divides by the global
count after the allreduce), and the number of correct predictions for classifiers."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def targets_for(loss: str, y: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    if loss == "cross_entropy":
        return y
    return y.to(outputs.dtype).reshape(len(y), -1)


def loss_sum(loss: str, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over samples of the per-sample loss (per-sample: mean over output units)."""
    t = targets_for(loss, y, outputs)
    if loss == "cross_entropy":
        return F.cross_entropy(outputs, t, reduction="sum")
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(outputs, t, reduction="none").mean(dim=1).sum()
    return (outputs - t).square().mean(dim=1).sum()


def correct(loss: str, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Correct predictions in the batch (0 for mse, which has no accuracy)."""
    if loss == "cross_entropy":
        return (outputs.argmax(dim=1) == y).sum()
    if loss == "bce":
        t = targets_for(loss, y, outputs)
        return ((outputs > 0) == (t > 0.5)).all(dim=1).sum()
    return torch.zeros((), dtype=torch.long)


def predict(loss: str, outputs: torch.Tensor) -> torch.Tensor:
    """Predictions from raw outputs: class ids, 0/1 for bce, values for mse."""
    if loss == "cross_entropy":
        return outputs.argmax(dim=1)
    if loss == "bce":
        return (outputs > 0).long().squeeze(1) if outputs.shape[1] == 1 else (outputs > 0).long()
    return outputs
