"""Losses summed over the samples of a batch (the training loop scales by 1 / the global
count before backward), built in or the user's, and predictions from raw outputs.

A user loss is `fn(outputs, targets) -> one loss per sample` (a tensor of shape [N]):
the core sums it and divides by the global batch's sample count, so the gradient is the
mean over the global batch however the samples are spread over the workers. A loss that
reduces by itself (a mean over its batch) would weight small local batches wrongly: it
is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .. import config, usercode
from ..errors import ConfigError


def targets_for(loss: str, y: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    if loss == "cross_entropy":
        return y
    return y.to(outputs.dtype).reshape(len(y), -1)


def loss_sum(loss: str, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A built-in loss, summed over samples (per sample: the mean over output units)."""
    t = targets_for(loss, y, outputs)
    if loss == "cross_entropy":
        return F.cross_entropy(outputs, t, reduction="sum")
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(outputs, t, reduction="none").mean(dim=1).sum()
    return (outputs - t).square().mean(dim=1).sum()


@dataclass(frozen=True)
class Loss:
    name: str  # a built-in's name, or the user's 'module:fn' (or the function's name)
    per_sample: Callable | None = None  # the user's fn; None for a built-in

    @property
    def builtin(self) -> bool:
        return self.per_sample is None

    def sum(self, outputs, targets) -> torch.Tensor:
        """The loss summed over the batch's samples."""
        if self.per_sample is None:
            return loss_sum(self.name, outputs, targets)
        values = self.per_sample(outputs, targets)
        n = batch_len(targets)
        if not isinstance(values, torch.Tensor) or values.shape != (n,):
            shape = list(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ConfigError("train.loss", f"{self.name} must return one loss per sample (shape [{n}]), "
                              f"returned {shape}: compute it with reduction='none'")
        return values.sum()


def resolve(name: str, given: Callable | None = None) -> Loss:
    """The loss `train.loss` names, or `given` (a callable from the Python API)."""
    if given is not None:
        return Loss(getattr(given, "__qualname__", "loss"), given)
    if config.is_target(name):
        return Loss(name, usercode.load(name, "train.loss"))
    return Loss(name)


def batch_len(t) -> int:
    """Samples in a batch of targets (a tensor, or a tuple/list/dict of them)."""
    if isinstance(t, torch.Tensor):
        return len(t)
    first = next(iter(t.values() if isinstance(t, dict) else t))
    return batch_len(first)


def probabilities(loss: str, outputs: torch.Tensor) -> torch.Tensor | None:
    """Class probabilities from raw outputs: softmax for cross_entropy, sigmoid for bce;
    None where the outputs are values, not classes (mse, a user's loss)."""
    if loss == "cross_entropy":
        return outputs.float().softmax(dim=1)
    if loss == "bce":
        return outputs.float().sigmoid()
    return None


def predict(loss: str, outputs: torch.Tensor) -> torch.Tensor:
    """Predictions from raw outputs: class ids for cross_entropy, 0/1 for bce, the outputs
    themselves for mse and for a user's loss."""
    if loss == "cross_entropy":
        return outputs.argmax(dim=1)
    if loss == "bce":
        return (outputs > 0).long().squeeze(1) if outputs.shape[1] == 1 else (outputs > 0).long()
    return outputs
