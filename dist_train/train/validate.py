"""Checks of data against config and model, run before any worker trains.

Config keys are checked as they are read (config.py); what needs the data or the model
is checked here: labels in range, input shape the model accepts, finite values,
held-out rows that leave something to train on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import models
from ..data import sharding
from ..data import Dataset, find_nonfinite
from ..errors import ConfigError, DataError, first_line


@dataclass
class DataStats:
    """What the checks need to know of a dataset; computed by numpy here, by Spark
    aggregates on the executors for a DataFrame."""

    name: str
    n: int
    sample_shape: tuple[int, ...]
    label_kind: str  # numpy dtype kind of the labels: "i", "u" or "f"
    label_min: float
    label_max: float
    label_width: int  # 1 for a label per row, k for (n, k) targets
    labels_binary: bool  # every label is 0 or 1

    @classmethod
    def of(cls, ds: Dataset) -> "DataStats":
        y = ds.y
        if len(y) == 0:
            return cls(ds.name, 0, ds.sample_shape, y.dtype.kind, 0, 0, 1, True)
        return cls(ds.name, len(ds), ds.sample_shape, y.dtype.kind, float(y.min()), float(y.max()),
                   1 if y.ndim == 1 else int(y.shape[1]), bool(np.isin(y, (0, 1)).all()))


def outputs_for(cfg, stats: DataStats) -> int:
    """The model's output width: model.outputs, else what the labels need."""
    if cfg.model.outputs is not None:
        return cfg.model.outputs
    if cfg.train.loss == "cross_entropy":
        return max(int(stats.label_max) + 1, 1) if stats.n else 1
    return stats.label_width


def check(cfg, ds: Dataset) -> int:
    """Validate `ds` for `cfg`; return the model's output width. Raises UserError."""
    bad_row = find_nonfinite(ds.x)
    if bad_row is not None:
        raise DataError(f"{ds.name}: row {bad_row} holds NaN or Inf")
    return check_stats(cfg, DataStats.of(ds))


def check_stats(cfg, st: DataStats) -> int:
    """Validate a dataset described by `st`; return the model's output width."""
    if st.n == 0:
        raise DataError(f"{st.name}: the dataset has no rows")
    loss = cfg.train.loss
    if loss == "cross_entropy" and st.label_kind not in "iu":
        raise DataError(f"{st.name}: train.loss cross_entropy needs integer class labels, got float labels")
    if loss == "bce" and not st.labels_binary:
        raise DataError(f"{st.name}: train.loss bce needs labels 0 or 1, found labels in "
                        f"[{st.label_min:g}, {st.label_max:g}]")
    if loss == "cross_entropy" and st.label_min < 0:
        raise DataError(f"{st.name}: label {int(st.label_min)} is negative")
    outputs = outputs_for(cfg, st)
    model = models.build(cfg, st.sample_shape, outputs)
    width = _probe_output_width(model, st, cfg)
    if cfg.model.target is None and width != outputs:  # cannot happen for built-ins; guards the probe
        raise ConfigError("model.outputs", f"model gives {width} outputs, expected {outputs}")
    if loss == "cross_entropy":
        if int(st.label_max) >= width:
            key = "model.outputs" if cfg.model.outputs is not None or cfg.model.target else "model.name"
            raise ConfigError(key, f"label {int(st.label_max)} is out of range for a model with {width} outputs")
    elif st.label_width != width:
        raise ConfigError("model.outputs", f"targets have width {st.label_width} but the model gives {width} outputs")
    train, held = sharding.split_rows(0, st.n, cfg.seed, cfg.data.eval_fraction)
    if len(train) == 0:
        raise ConfigError("data.eval_fraction", f"{cfg.data.eval_fraction} leaves no training rows of {st.n}")
    if cfg.data.eval_fraction > 0 and len(held) == 0:
        raise ConfigError("data.eval_fraction", f"{cfg.data.eval_fraction} of {st.n} rows holds out none; "
                          f"use 0 to evaluate on the training rows")
    return width


def _probe_output_width(model, st: DataStats, cfg) -> int:
    """Run one sample through the model on the CPU: a shape mismatch shows here, not mid-job."""
    sample = torch.zeros((1, *st.sample_shape))
    model.eval()  # one sample: batch statistics (BatchNorm) are for training
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as e:  # noqa: BLE001 - mismatched shapes raise RuntimeError, users' code anything
        raise DataError(f"{st.name}: samples of shape {list(st.sample_shape)} do not fit the model "
                        f"({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError("model.target" if cfg.model.target else "model.name",
                          f"the model must return a (batch, outputs) tensor, returned {shape} for one sample")
    return int(out.shape[1])
