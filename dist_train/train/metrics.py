"""Metrics: each a (sum, count) pair over a batch, so that summed over the workers (in the
training step's tail, and in evaluation) their ratio is exact however the samples are
spread. Built in: accuracy, topK (top5, ...), mae, mse; or the user's
`fn(outputs, targets)` returning a value per sample (a tensor of shape [N]: summed, and
counted as N) or a (sum, count) pair.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from .. import config, usercode
from .losses import batch_len


def accuracy(outputs: torch.Tensor, y: torch.Tensor):
    """Class ids against the argmax of several outputs; 0/1 labels (or multi-label
    targets) against outputs > 0 (a logit), every unit right."""
    if not y.is_floating_point() and outputs.ndim == 2 and outputs.shape[1] > 1 and y.ndim == 1:
        return (outputs.argmax(dim=1) == y).sum(), len(y)
    t = y.to(outputs.dtype).reshape(len(y), -1)
    return ((outputs > 0).reshape(len(y), -1) == (t > 0.5)).all(dim=1).sum(), len(y)


def top_k(k: int) -> Callable:
    def top(outputs: torch.Tensor, y: torch.Tensor):
        best = outputs.topk(min(k, outputs.shape[1]), dim=1).indices
        return (best == y.reshape(-1, 1)).any(dim=1).sum(), len(y)

    return top


def mae(outputs: torch.Tensor, y: torch.Tensor):
    t = y.to(outputs.dtype).reshape(len(y), -1)
    return (outputs.reshape(len(y), -1) - t).abs().mean(dim=1).sum(), len(y)


def mse(outputs: torch.Tensor, y: torch.Tensor):
    t = y.to(outputs.dtype).reshape(len(y), -1)
    return (outputs.reshape(len(y), -1) - t).square().mean(dim=1).sum(), len(y)


@dataclass(frozen=True)
class Metric:
    name: str  # the key in metrics lines and summaries
    fn: Callable

    def __call__(self, outputs, targets) -> tuple[float, float]:
        """(sum, count) over this batch."""
        got = self.fn(outputs, targets)
        if isinstance(got, tuple):
            total, count = got
        else:
            total, count = got.sum(), batch_len(targets)
        return float(total), float(count)


def resolve(names: list | None, loss) -> list[Metric]:
    """The metrics `train.metrics` names; null: accuracy for cross_entropy and bce."""
    if names is None:
        names = ["accuracy"] if loss.builtin and loss.name in ("cross_entropy", "bce") else []
    found = []
    for name in names:
        if config.is_target(name):
            found.append(Metric(name.partition(":")[2].split(".")[-1], usercode.load(name, "train.metrics")))
        elif re.fullmatch(r"top\d+", name):
            found.append(Metric(name, top_k(int(name[3:]))))
        else:
            found.append(Metric(name, {"accuracy": accuracy, "mae": mae, "mse": mse}[name]))
    return found
