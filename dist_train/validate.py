"""Checks of data against config and model, run before any worker trains.

Config keys are checked as they are read (config.py); what needs the data or the model
is checked here: labels in range, input shape the model accepts, finite values,
held-out rows that leave something to train on.
"""

from __future__ import annotations

import numpy as np
import torch

from . import models, sharding
from .data import Dataset, find_nonfinite
from .errors import ConfigError, DataError


def outputs_for(cfg, ds: Dataset) -> int:
    """The model's output width: model.outputs, else what the labels need."""
    if cfg.model.outputs is not None:
        return cfg.model.outputs
    if cfg.train.loss == "cross_entropy":
        return max(ds.classes or 1, 1)
    return 1 if ds.y.ndim == 1 else int(ds.y.shape[1])


def check(cfg, ds: Dataset, world_size: int = 1) -> int:
    """Validate `ds` for `cfg`; return the model's output width. Raises UserError."""
    n = len(ds)
    if n == 0:
        raise DataError(f"{ds.name}: the dataset has no rows")
    loss = cfg.train.loss
    if loss == "cross_entropy" and ds.y.dtype.kind not in "iu":
        raise DataError(f"{ds.name}: train.loss cross_entropy needs integer class labels, got {ds.y.dtype}")
    if loss == "bce" and not np.isin(np.unique(ds.y), (0, 1)).all():
        raise DataError(f"{ds.name}: train.loss bce needs labels 0 or 1, found {np.unique(ds.y)[:5].tolist()}")
    if loss == "cross_entropy" and ds.y.min() < 0:
        raise DataError(f"{ds.name}: label {int(ds.y.min())} at row {int(np.argmin(ds.y))} is negative")
    bad_row = find_nonfinite(ds.x)
    if bad_row is not None:
        raise DataError(f"{ds.name}: row {bad_row} holds NaN or Inf")
    outputs = outputs_for(cfg, ds)
    model = models.build(cfg, ds.sample_shape, outputs)
    width = _probe_output_width(model, ds, cfg)
    if cfg.model.target is None and width != outputs:  # cannot happen for built-ins; guards the probe
        raise ConfigError("model.outputs", f"model gives {width} outputs, expected {outputs}")
    if loss == "cross_entropy":
        top = int(ds.y.max())
        if top >= width:
            key = "model.outputs" if cfg.model.outputs is not None or cfg.model.target else "model.name"
            raise ConfigError(key, f"label {top} (row {int(np.argmax(ds.y))}) is out of range for a model "
                              f"with {width} outputs")
    elif loss in ("mse", "bce"):
        need = 1 if ds.y.ndim == 1 else ds.y.shape[1]
        if need != width:
            raise ConfigError("model.outputs", f"targets have width {need} but the model gives {width} outputs")
    train, held = sharding.split_rows(0, n, cfg.seed, cfg.data.eval_fraction)
    if len(train) == 0:
        raise ConfigError("data.eval_fraction", f"{cfg.data.eval_fraction} leaves no training rows of {n}")
    if cfg.data.eval_fraction > 0 and len(held) == 0:
        raise ConfigError("data.eval_fraction", f"{cfg.data.eval_fraction} of {n} rows holds out none; "
                          f"use 0 to evaluate on the training rows")
    return width


def _probe_output_width(model, ds: Dataset, cfg) -> int:
    """Run one sample through the model on the CPU: a shape mismatch shows here, not mid-job."""
    sample = torch.from_numpy(np.ascontiguousarray(ds.x[:1]))
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as e:  # noqa: BLE001 - mismatched shapes raise RuntimeError, users' code anything
        raise DataError(f"{ds.name}: samples of shape {list(ds.sample_shape)} do not fit the model "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError("model.target" if cfg.model.target else "model.name",
                          f"the model must return a (batch, outputs) tensor, returned {shape} for one sample")
    return int(out.shape[1])
