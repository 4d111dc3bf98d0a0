"""Models: built-in perceptron, MLP and LeNet-style CNN, or any user module by import path.

Every model maps a batch of samples (N, *sample_shape) to raw outputs (N, outputs):
logits for classification. Activations that belong to the loss (softmax, sigmoid)
live in the loss, where they are numerically stable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import usercode
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


def build(cfg, sample_shape, outputs: int | None, given=None) -> nn.Module:
    """The model for samples of `sample_shape` (a tuple, or a tuple/dict of them for several
    inputs) and `outputs` outputs (None: unknown, the model decides): `given` (an nn.Module,
    or a factory), else `cfg.model.target`'s factory, else the built-in `cfg.model.name`.
    A factory gets `cfg.model.kwargs`, and `input_shape` and `outputs` where its signature
    takes them."""
    m = cfg.model
    if isinstance(given, nn.Module):
        return given
    if given is not None or m.target:
        key = "model.target" if given is None else "model"
        factory = given if given is not None else usercode.load(m.target, key)
        offered = {"input_shape": sample_shape} | ({"outputs": outputs} if outputs is not None else {})
        model = usercode.call(factory, key, m.kwargs, **offered)
        if not isinstance(model, nn.Module):
            raise ConfigError(key, f"{m.target or 'the factory'} returned {type(model).__name__}, "
                              f"not a torch.nn.Module")
        return model
    if not isinstance(sample_shape, tuple) or not all(isinstance(d, int) for d in sample_shape):
        raise ConfigError("model.name", f"the built-in {m.name} takes one tensor per sample; the data gives "
                          f"{sample_shape}: set model.target")
    if outputs is None:
        raise ConfigError("model.outputs", "the data does not say how many outputs the model needs: set "
                          "model.outputs (or give the dataset a num_classes attribute)")
    inputs = math.prod(sample_shape)
    if m.name == "perceptron":
        return Perceptron(inputs, outputs)
    if m.name == "mlp":
        return mlp(inputs, m.hidden, outputs)
    return LeNet(tuple(sample_shape), outputs)


def apply(model: nn.Module, inputs):
    """The model on a batch of inputs: a tensor as model(x), a tuple or list as
    model(*inputs), a dict as model(**inputs) (several inputs, each batched)."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)
