"""The data context -> the model context: how a host batch reaches the device.

On the CPU a batch is used where it lies (nothing here runs). On a GPU, rows are gathered
straight into pinned host memory (torch's caching host allocator: a buffer is reused
once the copy that read it is done), and `ahead` copies batch k+1 on a side stream while
step k computes: the step's stream waits only for a copy that is already done.
"""

from __future__ import annotations

import numpy as np
import torch


def gather(x: np.ndarray, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """x[rows] as a host tensor: pinned (filled in place, no second copy) where it goes to a GPU."""
    if device.type != "cuda":
        return torch.from_numpy(np.ascontiguousarray(x[rows]))
    out = torch.empty((len(rows), *x.shape[1:]), dtype=torch.from_numpy(x[:0]).dtype, pin_memory=True)
    np.take(x, rows, axis=0, out=out.numpy())
    return out


def to_device(t, device: torch.device, non_blocking: bool = True):
    """A tensor, or a tuple/list/dict of them, on `device` (a host tensor is pinned first)."""
    if isinstance(t, torch.Tensor):
        if device.type == "cpu" or t.device == device:
            return t
        if t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=non_blocking)
    if isinstance(t, dict):
        return {k: to_device(v, device, non_blocking) for k, v in t.items()}
    if isinstance(t, (tuple, list)):
        return type(t)(to_device(v, device, non_blocking) for v in t)
    return t


def ahead(batches, device: torch.device):
    """(samples, inputs, targets) host batches -> the same on `device`, each copied on a
    side stream one batch ahead of its use. The identity on the CPU."""
    if device.type != "cuda":
        yield from batches
        return
    stream, it = torch.cuda.Stream(device), iter(batches)
    compute = torch.cuda.current_stream(device)

    def issue(item):
        if item is None:
            return None
        n, xb, yb = item
        with torch.cuda.stream(stream):
            return n, to_device(xb, device), to_device(yb, device)

    pending = issue(next(it, None))
    while pending is not None:
        compute.wait_stream(stream)  # the copy of this batch, issued a step ago
        for t in tensors(pending[1:]):
            t.record_stream(compute)  # made on the side stream, used on this one: not freed early
        current, pending = pending, issue(next(it, None))  # the next copy runs while this batch computes
        yield current


def tensors(t) -> list[torch.Tensor]:
    if isinstance(t, torch.Tensor):
        return [t]
    if isinstance(t, dict):
        return [x for k in sorted(t) for x in tensors(t[k])]
    if isinstance(t, (tuple, list)):
        return [x for v in t for x in tensors(v)]
    return []
