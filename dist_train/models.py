"""Models: built-in perceptron, MLP and LeNet-style CNN, or any user module by import path.

Every model maps a batch of samples (N, *sample_shape) to raw outputs (N, outputs):
logits for classification. Activations that belong to the loss (softmax, sigmoid)
live in the loss, where they are numerically stable.
"""

from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state_dict) whose backward can write its weight
    and bias gradients straight into their `.grad` tensors, views into the fused
    gradient buffer (gradsync.FusedGrads turns it on with `grads_in_place`): the step's
    first backward writes them as the GEMM's output, later micro-batches add to them.
    That saves zeroing the buffer and a read-add-write pass over it per step (~5% of a
    784-512-512-10 step). The gradients are bit for bit autograd's own."""

    grads_in_place = False  # set per layer by FusedGrads
    grads_written = False  # this step's first backward has run

    def forward(self, x):
        if self.grads_in_place and torch.is_grad_enabled():
            return self._forward_in_place(x)
        return F.linear(x, self.weight, self.bias)

    @torch.jit.unused
    def _forward_in_place(self, x):
        return _LinearGradsInPlace.apply(x, self.weight, self.bias, self)


class _LinearGradsInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.save_for_backward(x, weight)
        ctx.layer = layer
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        layer = ctx.layer
        gx = g.matmul(weight) if ctx.needs_input_grad[0] else None
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        if layer.grads_written:  # a later micro-batch: added as autograd adds (not in the GEMM: other bits)
            weight.grad.add_(g2.t().mm(x2))
            if layer.bias is not None:
                layer.bias.grad.add_(g2.sum(0))
        else:
            torch.mm(g2.t(), x2, out=weight.grad)
            if layer.bias is not None:
                torch.sum(g2, 0, out=layer.bias.grad)
            layer.grads_written = True
        return gx, None, None, None  # autograd adds nothing to weight and bias


class Perceptron(nn.Module):
    """Rosenblatt's unit with a sigmoid instead of the step function: a step has zero
    gradient almost everywhere, so backprop cannot train it. The sigmoid is applied by
    the `bce` loss (and at prediction: output > 0 means yes), which is the same unit."""

    def __init__(self, inputs: int, outputs: int = 1):
        super().__init__()
        self.linear = Linear(inputs, outputs)

    def forward(self, x):
        return self.linear(x.flatten(1))


def mlp(inputs: int, hidden: list[int], outputs: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = inputs
    for h in hidden:
        layers += [Linear(width, h), nn.ReLU()]
        width = h
    layers.append(Linear(width, outputs))
    return nn.Sequential(*layers)


class LeNet(nn.Module):
    """LeNet-5 style: two 5x5 conv + max-pool stages, then 120-84-outputs. Padding keeps
    small images (8x8 digits) as valid as MNIST's 28x28."""

    def __init__(self, sample_shape: tuple[int, ...], outputs: int):
        super().__init__()
        if len(sample_shape) != 3:
            raise ConfigError("model.name", f"lenet needs image samples (channels, height, width), "
                              f"the data has samples of shape {tuple(sample_shape)}")
        c, h, w = sample_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = 16 * (h // 4) * (w // 4)
        if flat == 0:
            raise ConfigError("model.name", f"lenet needs images of at least 4x4, got {h}x{w}")
        self.classifier = nn.Sequential(
            nn.Flatten(), Linear(flat, 120), nn.ReLU(), Linear(120, 84), nn.ReLU(), Linear(84, outputs))

    def forward(self, x):
        return self.classifier(self.features(x))


def load_target(target: str):
    """'package.module:factory' -> the factory, or a ConfigError naming what failed."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix
        raise ConfigError("model.target", f"cannot import {module_name!r}: {type(e).__name__}: {e}") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ConfigError("model.target", f"module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise ConfigError("model.target", f"{target} is not callable")
    return factory


def build(cfg, sample_shape: tuple[int, ...], outputs: int) -> nn.Module:
    """The model `cfg.model` describes, for samples of `sample_shape` and `outputs` outputs."""
    m = cfg.model
    if m.target:
        factory = load_target(m.target)
        try:
            model = factory(**m.kwargs)
        except Exception as e:  # noqa: BLE001
            raise ConfigError("model.target", f"{m.target}(**model.kwargs) raised {type(e).__name__}: {e}") from None
        if not isinstance(model, nn.Module):
            raise ConfigError("model.target", f"{m.target} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    inputs = math.prod(sample_shape)
    if m.name == "perceptron":
        return Perceptron(inputs, outputs)
    if m.name == "mlp":
        return mlp(inputs, m.hidden, outputs)
    return LeNet(tuple(sample_shape), outputs)
