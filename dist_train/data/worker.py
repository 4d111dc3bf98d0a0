"""What one worker holds of the data: rows [offset, offset + len(x)) of a source of n
rows, and how a batch of them reaches the device (the data context -> the model context)."""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from . import transfer
from .spool import RESIDENT_BYTES, Pager, mapping, will_need

HEAD_ROWS = 64  # rows hashed into the data's fingerprint
AHEAD = 1  # chunks of a file-backed shard's batches gathered ahead of the step
CHUNK = 4  # batches gathered per handover between the threads (a handover: ~40-60 us here, however ready the batch)


@dataclass
class WorkerData:
    x: np.ndarray
    y: np.ndarray
    n: int  # rows in the whole source (every worker's shard together)
    outputs: int  # the model's output width, decided from the whole source
    offset: int = 0
    head: str | None = None  # a hash of the source's first rows, where this worker can see them
    resident: int = RESIDENT_BYTES  # bytes of a file-backed x kept mapped (0: no limit)
    window: int = 0  # data.shuffle_window: the order goes window by window; a file-backed x reads the next one ahead
    pager: Pager = field(init=False, repr=False)

    def __post_init__(self):
        # a spooled or memory-mapped shard: resident memory stays bounded (0: the page cache decides); a windowed
        # order reads a window's rows before the next one's: two windows are kept (else its pages would be given
        # back and faulted again every few batches, ~4x slower)
        row = int(np.prod(self.x.shape[1:], dtype=np.int64)) * self.x.itemsize
        self.pager = Pager(self.x, self.y, budget=max(self.resident, 2 * self.window * row)) if self.resident else Pager()

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
        asked from rows in memory; from a file-backed shard (a spool, a memory-mapped .npz),
        gathered on a thread CHUNK batches at a time, a chunk ahead, where its page faults
        overlap the step; copied one batch ahead on a side stream to a GPU (transfer.ahead)."""
        on_disk = mapping(self.x) is not None
        if self.window and isinstance(batches, list) and on_disk:
            batches = self._reading_ahead(batches)
        gathered = ((len(rows), *self.batch(rows, device)) for rows in batches)
        return transfer.ahead(_ahead_on_a_thread(gathered) if on_disk else gathered, device)

    def _reading_ahead(self, batches: list[np.ndarray]):
        """The batches as they are; entering a window's batches, the next window's rows are
        asked of the disk on a thread (spool.will_need), so they are in the page cache when
        reached. The first window is asked for before its first batch."""
        runs = windows(batches, self.window, self.offset)
        first = {run[0]: j for j, run in enumerate(runs)}
        for k, rows in enumerate(batches):
            j = first.get(k)
            if j is not None:
                if j == 0:
                    will_need(self.x, runs[0][1], runs[0][2])
                if j + 1 < len(runs):
                    threading.Thread(target=will_need, args=(self.x, *runs[j + 1][1:]), daemon=True,
                                     name="dist-train-readahead").start()
            yield rows

    def fingerprint(self) -> dict:
        """What every worker must agree on before training: the source's size and sample
        description, the model's outputs, and (where this worker holds them) its first rows."""
        return {"rows": self.n, "sample_shape": list(self.sample_shape), "label_kind": self.y.dtype.kind,
                "outputs": self.outputs, "first_rows": self.head}

    @classmethod
    def whole(cls, ds, outputs: int, resident: int = RESIDENT_BYTES, window: int = 0) -> "WorkerData":
        """Every row of `ds` (local mode and MPI ranks hold the whole source)."""
        return cls(ds.x, ds.y, len(ds), outputs, head=head_hash(ds.x, ds.y), resident=resident, window=window)


def _ahead_on_a_thread(items, depth: int = AHEAD, chunk: int = CHUNK):
    """The items of a generator, made on a thread `chunk` at a time, up to `depth` chunks
    ahead of the one in use: one handover between the threads per chunk, not per item
    (the order and the items are the generator's; an exception is raised where it came)."""
    with ThreadPoolExecutor(1, thread_name_prefix="dist-train-gather") as pool:
        pending = deque(pool.submit(_take, items, chunk) for _ in range(depth))  # one thread: made in order
        while True:
            made, error = pending.popleft().result()
            if not made and error is None:
                return
            pending.append(pool.submit(_take, items, chunk))
            yield from made
            if error is not None:
                raise error


def _take(items, n: int) -> tuple[list, BaseException | None]:
    """Up to `n` next items (fewer at the end), and the exception that stopped them, if one did."""
    made = []
    try:
        for _ in range(n):
            made.append(next(items))
    except StopIteration:
        pass
    except BaseException as e:  # noqa: BLE001 - raised in the consumer's thread, after the items before it
        return made, e
    return made, None


def windows(batches: list[np.ndarray], window: int, offset: int = 0) -> list[tuple[int, int, int]]:
    """(first batch, lo, hi) of each run of consecutive batches within one span [lo, hi) of
    local rows no wider than a window: in a windowed order (sharding's data.shuffle_window),
    one a window. A window of `window` rows spans about window * (rows' span / rows) rows
    (held-out rows lie between); a batch wider than that straddles two windows and joins
    its run without widening it."""
    sizes = [len(b) for b in batches]
    if not sum(sizes):
        return []
    lows, highs = [int(b.min()) if len(b) else 0 for b in batches], [int(b.max()) if len(b) else 0 for b in batches]
    density = sum(sizes) / (max(highs) - min(lo for lo, n in zip(lows, sizes) if n) + 1)
    cap = 1.25 * window / density + 1
    runs: list[list[int]] = []
    for k, (lo, hi, n) in enumerate(zip(lows, highs, sizes)):
        lo, hi = lo - offset, hi - offset + 1
        if not n or hi - lo > cap:  # empty, or across two windows
            continue
        if runs and max(hi, runs[-1][2]) - min(lo, runs[-1][1]) <= cap:
            runs[-1][1:] = min(lo, runs[-1][1]), max(hi, runs[-1][2])
        else:
            runs.append([k, lo, hi])
    return [tuple(r) for r in runs]


def head_hash(x: np.ndarray, y: np.ndarray) -> str:
    """sha256 of the first HEAD_ROWS rows' features and labels (a memory map reads only those)."""
    h = hashlib.sha256()
    for a in (x[:HEAD_ROWS], y[:HEAD_ROWS]):
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]
