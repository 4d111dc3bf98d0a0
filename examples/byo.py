"""Bring your own model, data and loss: a worked example (README, "Bring your own model and data").

    dist-train local examples/byo.yaml --out runs/byo
    dist-train mpi -n 2 examples/byo.yaml --out runs/byo-mpi
    dist-train spark examples/byo.yaml --master 'local[2]' --out runs/byo-spark
    python examples/byo_train.py runs/byo-script        (the same, from a script: dist_train.fit)

The dataset pads the 8x8 digits to 10x10 and crops a random 8x8 window of each one in
training (the centre in evaluation). Its randomness comes from `item_generator()`, seeded
by (seed, epoch, row), so every launcher, any `data.workers` and a `--resume` see the
same crops.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dist_train.data


class CroppedDigits:
    """The 1,797 digits, padded by `pad` pixels and cropped back to 8x8 at random."""

    num_classes = 10  # the model factory is told `outputs` from this

    def __init__(self, pad: int = 1):
        ds = dist_train.data.digits()
        self.pad = pad
        self.x = np.pad(ds.x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        self.y = ds.y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        if dist_train.data.training():
            top, left = torch.randint(0, 2 * self.pad + 1, (2,), generator=dist_train.data.item_generator()).tolist()
        else:
            top = left = self.pad
        return torch.from_numpy(self.x[i, :, top:top + 8, left:left + 8].copy()), int(self.y[i])


def small_cnn(input_shape, outputs, width: int = 16):
    """A small CNN for (channels, height, width) samples: told its input shape and outputs."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(2 * width * (h // 2) * (w // 2), 64), nn.ReLU(), nn.Linear(64, outputs))


def bn_mlp(input_shape, outputs, hidden: int = 64):
    """An MLP with BatchNorm and Dropout."""
    inputs = int(np.prod(input_shape))
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Dropout(0.1), nn.Linear(hidden, outputs))


def smooth_cross_entropy(outputs, targets):
    """Label smoothing: one loss per sample (reduction='none'); the core sums and averages."""
    return F.cross_entropy(outputs, targets, reduction="none", label_smoothing=0.1)


class TwoViews:
    """Each digit as two inputs, its left and right halves, in a dict."""

    num_classes = 10

    def __init__(self):
        ds = dist_train.data.digits()
        self.x, self.y = ds.x, ds.y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i]
        return {"left": x[:, :, :4], "right": x[:, :, 4:]}, int(self.y[i])


class TwoTower(nn.Module):
    """A model of two inputs: model(left=..., right=...)."""

    def __init__(self, input_shape, outputs, hidden: int = 32):
        super().__init__()
        self.left = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape["left"])), hidden), nn.ReLU())
        self.right = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape["right"])), hidden), nn.ReLU())
        self.head = nn.Linear(2 * hidden, outputs)

    def forward(self, left, right):
        return self.head(torch.cat([self.left(left), self.right(right)], dim=1))
