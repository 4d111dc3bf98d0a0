"""What one worker holds of the data: rows [offset, offset + len(x)) of a source of n
rows, and how a batch of them reaches the device (the data context -> the model context)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from . import transfer
from .spool import RESIDENT_BYTES, Pager

HEAD_ROWS = 64  # rows hashed into the data's fingerprint


@dataclass
class WorkerData:
    x: np.ndarray
    y: np.ndarray
    n: int  # rows in the whole source (every worker's shard together)
    outputs: int  # the model's output width, decided from the whole source
    offset: int = 0
    head: str | None = None  # a hash of the source's first rows, where this worker can see them
    resident: int = RESIDENT_BYTES  # bytes of a file-backed x kept mapped (0: no limit)
    pager: Pager = field(init=False, repr=False)

    def __post_init__(self):
        # a spooled or memory-mapped shard: resident memory stays bounded (0: the page cache decides)
        self.pager = Pager(self.x, self.y, budget=self.resident) if self.resident else Pager()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def batch(self, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Global row indices -> host tensors, pinned where they go to a GPU."""
        local = rows - self.offset if self.offset else rows
        xb, yb = transfer.gather(self.x, local, device), transfer.gather(self.y, local, device)
        self.pager.touch()
        return xb, yb

    def feed(self, epoch: int, batches, device: torch.device, training: bool = True):
        """(samples, inputs, targets) of each of `batches` in turn on `device`: gathered when
        asked on the CPU, one batch ahead on a side stream on a GPU (transfer.ahead)."""
        return transfer.ahead(((len(rows), *self.batch(rows, device)) for rows in batches), device)

    def fingerprint(self) -> dict:
        """What every worker must agree on before training: the source's size and sample
        description, the model's outputs, and (where this worker holds them) its first rows."""
        return {"rows": self.n, "sample_shape": list(self.sample_shape), "label_kind": self.y.dtype.kind,
                "outputs": self.outputs, "first_rows": self.head}

    @classmethod
    def whole(cls, ds, outputs: int, resident: int = RESIDENT_BYTES) -> "WorkerData":
        """Every row of `ds` (local mode and MPI ranks hold the whole source)."""
        return cls(ds.x, ds.y, len(ds), outputs, head=head_hash(ds.x, ds.y), resident=resident)


def head_hash(x: np.ndarray, y: np.ndarray) -> str:
    """sha256 of the first HEAD_ROWS rows' features and labels (a memory map reads only those)."""
    h = hashlib.sha256()
    for a in (x[:HEAD_ROWS], y[:HEAD_ROWS]):
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]
