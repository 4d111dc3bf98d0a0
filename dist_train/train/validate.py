"""Checks of data against config and model, run before any worker trains.

Config keys are checked as they are read (config.py); what needs the data or the model
is checked here: labels in range, input shape the model accepts, finite values,
held-out rows that leave something to train on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import config, models
from ..data import Dataset, Items, find_nonfinite, sharding
from ..errors import ConfigError, DataError, first_line
from . import losses


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
    if cfg.train.loss == "cross_entropy" and cfg.data.label_map:
        return len(cfg.data.label_map)
    if cfg.train.loss == "cross_entropy":
        return max(int(stats.label_max) + 1, 1) if stats.n else 1
    return stats.label_width


def check(cfg, ds, model=None, loss=None) -> int | None:
    """Validate `ds` (arrays, or a user's Items) for `cfg`; return the model's output width.
    `model` and `loss` stand in for the config's, as fit takes them. Raises UserError."""
    if isinstance(ds, Items):
        return check_items(cfg, ds, model, loss)
    bad_row = find_nonfinite(ds.x)
    if bad_row is not None:
        raise DataError(f"{ds.name}: row {bad_row} holds NaN or Inf")
    probe = torch.from_numpy(np.array(ds.x[:PROBE_ROWS])), torch.from_numpy(np.array(ds.y[:PROBE_ROWS]))
    return check_stats(cfg, DataStats.of(ds), model, loss, probe)


def check_stats(cfg, st: DataStats, model=None, loss=None, probe=None) -> int:
    """Validate a dataset described by `st` (and, if given, its first rows `probe`); return
    the model's output width."""
    if st.n == 0:
        raise DataError(f"{st.name}: the dataset has no rows")
    loss = losses.resolve(cfg.train.loss, loss)
    name = loss.name if loss.builtin else None
    if name == "cross_entropy" and st.label_kind not in "iu":
        raise DataError(f"{st.name}: train.loss cross_entropy needs integer class labels, got float labels in "
                        f"[{st.label_min:g}, {st.label_max:g}] (targets? use train.loss mse)")
    if name == "cross_entropy" and st.label_max >= MAX_CLASSES:
        raise DataError(f"{st.name}: label {int(st.label_max)} is too large to be a class id (a model with "
                        f"{int(st.label_max) + 1:,} outputs; at most {MAX_CLASSES:,}): class ids are 0..K-1")
    if name == "bce" and not st.labels_binary:
        raise DataError(f"{st.name}: train.loss bce needs labels 0 or 1, found labels in "
                        f"[{st.label_min:g}, {st.label_max:g}]")
    if name == "cross_entropy" and st.label_min < 0:
        raise DataError(f"{st.name}: label {int(st.label_min)} is negative")
    outputs = outputs_for(cfg, st) if loss.builtin or cfg.model.outputs else None
    if model is None:
        check_size(cfg, st.sample_shape, outputs)
    built = models.build(cfg, st.sample_shape, outputs, given=model)
    xb, yb = probe if probe is not None else (torch.zeros((PROBE_ROWS, *st.sample_shape)), None)
    width = _probe(cfg, st.name, built, xb, yb, loss)
    if width is None:
        width = outputs or st.label_width
    if cfg.model.target is None and model is None and width != outputs:  # not for built-ins; guards the probe
        raise ConfigError("model.outputs", f"model gives {width} outputs, expected {outputs}")
    if name == "cross_entropy":
        if int(st.label_max) >= width:
            key = "model.outputs" if cfg.model.outputs is not None or cfg.model.target else "model.name"
            raise ConfigError(key, f"label {int(st.label_max)} is out of range for a model with {width} outputs")
    elif loss.builtin and st.label_width != width:
        raise ConfigError("model.outputs", f"targets have width {st.label_width} but the model gives {width} outputs")
    _check_split(cfg, st.n)
    return width


MAX_CLASSES = 1 << 24  # class ids above this are not class ids (a mistaken label column), whatever the memory


def check_size(cfg, sample_shape, outputs) -> None:
    """ConfigError where the model (built on the meta device: no memory) could not be held,
    with its gradients and optimizer state, in this host's memory."""
    try:
        with torch.device("meta"):
            shell = models.build(cfg, sample_shape, outputs)
    except Exception:  # noqa: BLE001 - a user's model that cannot be built there: the real build will say
        return
    n = sum(p.numel() for p in shell.parameters())
    need, have = 4 * n * 4, config.physical_memory()  # weights, gradients, two optimizer moments
    if need > have:
        key = "model.outputs" if cfg.model.outputs is not None else "model.hidden" if cfg.model.name == "mlp" \
            else "model"
        raise ConfigError(key, f"the model has {n:,} parameters: with gradients and optimizer state about "
                               f"{need / 2**30:,.0f} GiB, more than this host's {have / 2**30:.0f} GiB")


def check_items(cfg, items: Items, model=None, loss=None) -> int | None:
    """Validate a user's dataset: its first items through the model and the loss. Its
    outputs: model.outputs, else the dataset's num_classes (or len(classes)), else what the
    model gives; set on `items` and returned."""
    loss = losses.resolve(cfg.train.loss, loss)
    hint = cfg.model.outputs or _classes(items.dataset)
    built = models.build(cfg, items.sample_shape, hint, given=model)
    xb, yb = items.batch(np.arange(min(PROBE_ROWS, items.n)), torch.device("cpu"))
    width = _probe(cfg, items.name, built, xb, yb, loss)
    if loss.builtin and loss.name == "cross_entropy" and isinstance(yb, torch.Tensor) and len(yb) \
            and int(yb.max()) >= (width or 0):
        raise ConfigError("model.outputs", f"label {int(yb.max())} (item {int(yb.argmax())}) is out of range "
                          f"for a model with {width} outputs")
    _check_split(cfg, items.n)
    items.outputs = width or hint
    return items.outputs


def _classes(dataset) -> int | None:
    """What a dataset says of its classes: num_classes, or len(classes) (as torchvision's have)."""
    n = getattr(dataset, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    classes = getattr(dataset, "classes", None)
    return len(classes) if isinstance(classes, (list, tuple)) and classes else None


def _check_split(cfg, n: int) -> None:
    train, held = sharding.split_rows(0, n, cfg.seed, cfg.data.eval_fraction)
    if len(train) == 0:
        raise ConfigError("data.eval_fraction", f"{cfg.data.eval_fraction} leaves no training rows of {n}")
    if cfg.data.eval_fraction > 0 and len(held) == 0:
        raise ConfigError("data.eval_fraction", f"{cfg.data.eval_fraction} of {n} rows holds out none; "
                          f"use 0 to evaluate on the training rows")


PROBE_ROWS = 2  # a batch of two in eval mode: BatchNorm and Dropout models run as they will in evaluation


def _probe(cfg, name: str, model, xb, yb, loss) -> int | None:
    """Run the first rows through the model (and the loss, where the targets are known) on
    the CPU: a shape mismatch shows here, not mid-job. The output width, if the outputs
    are a (batch, outputs) tensor (a built-in loss needs one)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                out = models.apply(model, xb)
            except Exception as e:  # noqa: BLE001 - mismatched shapes raise RuntimeError, users' code anything
                raise DataError(f"{name}: samples of shape {_shape(xb)} do not fit the model "
                                f"({type(e).__name__}: {first_line(e)})") from None
            tensor2d = isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[0] == losses.batch_len(xb)
            if loss.builtin and not tensor2d:
                shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ConfigError("model.target" if cfg.model.target else "model.name",
                                  f"the model must return a (batch, outputs) tensor, returned {shape} for a "
                                  f"batch of {losses.batch_len(xb)}")
            if yb is not None and not loss.builtin:
                loss.sum(out, yb)  # the per-sample contract (ConfigError naming train.loss)
    finally:
        model.train(was_training)
    return int(out.shape[1]) if tensor2d else None


def _shape(xb):
    from ..data.items import jsonable, shape_of

    return jsonable(shape_of(xb))
