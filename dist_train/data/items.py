"""A user's map-style dataset as a source: `__len__`, and `__getitem__(i) -> (inputs, target)`
for global row i, where inputs are a tensor or array, or a tuple or dict of them.

The core decides which rows each worker takes and in which order (sharding.py); the
dataset is only ever asked for item i. A batch is its items put together by
`data.collate` (torch's `default_collate` unless set; float64 becomes float32, as array
sources are read).

Randomness in `__getitem__` (augmentation) is reproducible: while item i of epoch e is
fetched, torch's, numpy's and Python's global generators are seeded from (seed, e, i),
and `item_generator()` returns a torch.Generator seeded alike; `training()` says whether
the item is for a training step (else evaluation). The same row in the same epoch gets
the same draws in any process, under any launcher, with any `data.workers`, and after a
`--resume`. In the worker itself (`data.workers: 0`) the global generators are restored
after each batch, so the model's own randomness (dropout) does not depend on the data.

`data.workers: N` fetches and collates in N processes per worker (a torch DataLoader over
the core's own index batches), up to two batches each ahead of the step. They are
started once per epoch and killed with their worker.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DataError
from . import transfer
from .transfer import tensors, to_device

_MASK = (1 << 64) - 1
FINGERPRINT_ITEMS = 4  # items hashed into the data's fingerprint


@dataclass(frozen=True)
class ItemContext:
    seed: int
    epoch: int  # -1 outside training (evaluation, the pre-flight probe)
    row: int
    training: bool

    @property
    def item_seed(self) -> int:
        """A 63-bit seed, a pure function of (seed, epoch, row, training)."""
        h = _mix(self.seed)
        for part in (self.epoch + 1, self.row, int(self.training)):
            h = _mix(h ^ part)
        return h >> 1


def _mix(x: int) -> int:
    """splitmix64's finaliser on Python ints (a few hundred ns, no numpy call per item)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


_CURRENT = ItemContext(0, -1, 0, False)  # the item being fetched in this process


def current() -> ItemContext:
    """The item being fetched: (seed, epoch, row, training)."""
    return _CURRENT


def item_generator() -> torch.Generator:
    """A torch.Generator seeded for the item being fetched (pass it as `generator=` to
    torch.randint, torch.rand, ...)."""
    return torch.Generator().manual_seed(_CURRENT.item_seed)


def training() -> bool:
    """Whether the item being fetched is for training (False in evaluation): augment then only."""
    return _CURRENT.training


def _enter(ctx: ItemContext) -> None:
    global _CURRENT
    _CURRENT = ctx
    s = ctx.item_seed
    torch.default_generator.manual_seed(s)  # (torch.manual_seed also seeds every device: ~150 us)
    random.seed(s)
    np.random.seed(s & 0xFFFFFFFF)


class Items:
    """The user's dataset as this worker's data: every worker holds it whole and asks it
    only for its own rows."""

    def __init__(self, dataset, seed: int, collate=None, workers: int = 0, name: str = "dataset"):
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise DataError(f"{name}: {type(dataset).__name__} is not a map-style dataset "
                            f"(it needs __len__ and __getitem__)")
        self.dataset, self.seed, self.workers, self.name = dataset, seed, workers, name
        self.collate = collate
        self.n = len(dataset)
        self.outputs: int | None = None  # decided by the pre-flight checks
        self.sample_shape = None  # the inputs' shape(s) per sample, from item 0

    # ------------------------------------------------------------ what the core asks

    def describe(self) -> None:
        """Read item 0 for the sample description."""
        if self.n == 0:
            raise DataError(f"{self.name}: the dataset has no rows")
        xb, _ = self.fetch(np.array([0]), -1, False)
        self.sample_shape = shape_of(xb, batched=True)

    def fetch(self, rows: np.ndarray, epoch: int, training: bool):
        """(inputs, targets) of these global rows, collated, on the host; the global
        generators as they were before."""
        with _kept_generators():
            items = self._items(rows, epoch, training)
        if self.collate is not None:
            batch = self.collate(items)
        else:
            if not all(isinstance(i, (tuple, list)) and len(i) == 2 for i in items):
                raise DataError(f"{self.name}: an item must be (inputs, target), got {type(items[0]).__name__}")
            batch = _float32(torch.utils.data.default_collate(items))
        return batch[0], batch[1]

    def _items(self, rows: np.ndarray, epoch: int, training: bool) -> list:
        items = []
        for r in rows.tolist():
            _enter(ItemContext(self.seed, epoch, r, training))
            try:
                items.append(self.dataset[r])
            except Exception as e:
                e.add_note(f"(while fetching item {r} of {self.name})")
                raise
        return items

    def batch(self, rows: np.ndarray, device: torch.device, epoch: int = -1, training: bool = False):
        """Global rows -> (inputs, targets) on the device."""
        xb, yb = self.fetch(rows, epoch, training)
        return to_device(xb, device), to_device(yb, device)

    def feed(self, epoch: int, batches, device: torch.device, training: bool = True):
        """(samples, inputs, targets) of each of `batches` in turn, fetched ahead by
        `data.workers` processes (or here, as asked, with none)."""
        yield from transfer.ahead(self._host_batches(epoch, batches, device, training), device)

    def _host_batches(self, epoch: int, batches, device: torch.device, training: bool):
        if self.workers == 0:
            for rows in batches:
                yield (len(rows), *self.fetch(rows, epoch, training))
            return
        keys = [(epoch, training, rows) for rows in batches]
        if not keys:
            return
        loader = torch.utils.data.DataLoader(
            _Batches(self), batch_size=None, sampler=keys, num_workers=min(self.workers, len(keys)),
            collate_fn=_as_is, worker_init_fn=_die_with_parent)  # pinned by transfer.ahead
        for (_, _, rows), batch in zip(keys, loader):
            xb, yb = _as_tensors(batch)
            yield len(rows), xb, yb

    def fingerprint(self) -> dict:
        """What every worker must agree on: the size, the sample description and the first items."""
        h = hashlib.sha256()
        xb, yb = self.fetch(np.arange(min(FINGERPRINT_ITEMS, self.n)), -1, False)
        for t in tensors(xb) + tensors(yb):
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.contiguous().numpy().tobytes())
        return {"rows": self.n, "sample_shape": jsonable(self.sample_shape), "outputs": self.outputs,
                "first_rows": h.hexdigest()[:16]}


class _Batches(torch.utils.data.Dataset):
    """What a DataLoader's workers are asked: a whole batch, by (epoch, training, rows)."""

    def __init__(self, items: Items):
        self.items = items

    def __getitem__(self, key):
        epoch, training, rows = key
        return _as_arrays(self.items.fetch(rows, epoch, training))


def _as_arrays(t):
    """A batch's CPU tensors as numpy arrays for the trip to the training worker: pickled
    through the pipe, ~1.35x the items/s of torch's shared-memory handover of each tensor
    (a file descriptor a tensor, served by a thread that takes the data worker's GIL).
    Tensors numpy cannot hold (bfloat16, ...) and other leaves go as they are."""
    if isinstance(t, torch.Tensor):
        if (type(t) is torch.Tensor and t.device.type == "cpu" and t.layout == torch.strided and not t.requires_grad
                and t.dtype in _NUMPY_DTYPES and not t.is_conj() and not t.is_neg()):
            return _Array(t.numpy())
        return t  # a sparse or subclassed tensor, or one numpy cannot hold: torch's own way
    if isinstance(t, dict):
        return {k: _as_arrays(v) for k, v in t.items()}
    if isinstance(t, (tuple, list)):
        return type(t)(_as_arrays(v) for v in t)
    return t


def _as_tensors(t):
    """The inverse of _as_arrays, without a copy."""
    if isinstance(t, _Array):
        return torch.from_numpy(t.array)
    if isinstance(t, dict):
        return {k: _as_tensors(v) for k, v in t.items()}
    if isinstance(t, (tuple, list)):
        return type(t)(_as_tensors(v) for v in t)
    return t


class _Array:
    """A tensor on its way back from a data worker (told apart from the user's own arrays)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array

    def __reduce__(self):
        return _Array, (self.array,)


_NUMPY_DTYPES = {torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64,
                 torch.uint8, torch.bool, torch.complex64, torch.complex128}


def _as_is(batch):
    return batch


def _die_with_parent(_worker_id: int) -> None:
    """A data worker ends the moment its training worker does (killed or not), so it never
    outlives the job, nor holds the worker's sockets open after it."""
    from ..failures import kill_with_parent

    kill_with_parent()


class _kept_generators:
    """The global generators' states, restored on leaving (the fetch seeds them per item)."""

    def __enter__(self):
        self.states = torch.get_rng_state(), random.getstate(), np.random.get_state()

    def __exit__(self, *exc):
        torch.set_rng_state(self.states[0])
        random.setstate(self.states[1])
        np.random.set_state(self.states[2])


def _float32(t):
    if isinstance(t, torch.Tensor):
        return t.float() if t.dtype == torch.float64 else t
    if isinstance(t, dict):
        return {k: _float32(v) for k, v in t.items()}
    if isinstance(t, (tuple, list)):
        return type(t)(_float32(v) for v in t)
    return t


def shape_of(xb, batched: bool = True):
    """The per-sample shape of a batch of inputs: a tuple, or a tuple/dict of tuples."""
    if isinstance(xb, torch.Tensor):
        return tuple(xb.shape[1:] if batched else xb.shape)
    if isinstance(xb, dict):
        return {k: shape_of(v, batched) for k, v in xb.items()}
    if isinstance(xb, (tuple, list)):
        return tuple(shape_of(v, batched) for v in xb)
    raise DataError(f"inputs must be tensors or arrays, or a tuple or dict of them, got {type(xb).__name__}")


def jsonable(shape):
    """A sample description (or any tree of numbers) for strict JSON: lists for tuples, null
    for NaN and Inf (a NaN input gives a NaN loss)."""
    if isinstance(shape, dict):
        return {k: jsonable(v) for k, v in shape.items()}
    if isinstance(shape, (tuple, list)):
        return [jsonable(v) for v in shape]
    if isinstance(shape, float) and not math.isfinite(shape):
        return None
    return shape


def from_jsonable(shape):
    """The inverse of jsonable: tuples again (a model.pt's meta back to a sample description)."""
    if isinstance(shape, dict):
        return {k: from_jsonable(v) for k, v in shape.items()}
    if isinstance(shape, list):
        return tuple(from_jsonable(v) for v in shape)
    return shape
