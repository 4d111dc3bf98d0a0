"""Gradient averaging, in one place (STYLE.md 5).

Every trainable parameter's `.grad` is a view into one flat buffer, so backward writes
straight into it: no packing before the allreduce, no unpacking after. Behind the
gradients sit a few statistics of the local batch, summed in the same collective:

    [ grads ... | sample count | loss sum | correct | has more batches | non-finite | which ranks
                | seconds of the previous step: data, compute, exchange, waiting for peers ]

One allreduce(sum) then gives the global count, so the division by it is exact even
when local batches differ in size or are empty, and it costs no extra collective. We
divide after the sum (not each worker by its own count before it) because only the
global count gives the mean over the global batch.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from . import models

TAIL = 10  # count, loss sum, correct, more, workers with a non-finite loss, bitmask of those ranks (< 24),
#            and this worker's data / compute / comm / wait seconds of its previous step (summed: all workers')
TIMES = ("data", "compute", "comm", "wait")
MASK_RANKS = 24  # ranks a float32 bitmask names exactly
# a models.Linear writes its gradients in place from this weight size on: below it the
# Python autograd.Function (~30 us a layer) costs more than the passes it saves. In a
# world of one only where autograd would map a fresh gradient each step: glibc mmaps
# (and the kernel page-faults in) allocations above its largest threshold, 32 MB.
IN_PLACE_MIN_BYTES, IN_PLACE_MIN_BYTES_ALONE = 256 << 10, 32 << 20


@dataclass
class StepStats:
    count: int  # samples in the global batch
    loss: float  # mean loss over the global batch
    correct: int  # correct predictions in the global batch
    more: bool  # does any worker have another batch this epoch
    nonfinite: int = 0  # workers whose loss was NaN or Inf
    nonfinite_ranks: tuple[int, ...] = ()  # which (those below MASK_RANKS)
    times: tuple[float, ...] = (0.0,) * len(TIMES)  # the previous step's seconds (TIMES), summed over workers


class FusedGrads:
    """Gradients of `model` as views into one flat buffer, with the stats tail.

    `models.Linear` layers write their gradients into the buffer from their own backward
    (`grads_in_place`, off under autocast; layers of `in_place_min_bytes` or more), so
    only the rest of the buffer is cleared each step.

    A world of one (`comm.world_size == 1`) has nothing to sum: there the buffer holds
    only the in-place layers' gradients, the others stay PyTorch's own tensors (cleared
    by dropping them, as zero_grad does), and the loss is scaled by 1 / the step's sample
    count before backward, so no pass over the gradients is added to the plain loop's
    (which, for the wide MLP's 64 MB weight, page-faults in a fresh gradient every step)."""

    def __init__(self, model: nn.Module, comm=None, grads_in_place: bool = True,
                 in_place_min_bytes: int | None = None):
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"all trainable parameters must share one dtype, got {sorted(map(str, dtypes))}")
        total = sum(p.numel() for p in params)
        dtype, device = params[0].dtype, params[0].device
        self.params, self.alone = params, comm is not None and comm.world_size == 1
        if in_place_min_bytes is None:
            in_place_min_bytes = IN_PLACE_MIN_BYTES_ALONE if self.alone else IN_PLACE_MIN_BYTES
        self.in_place: list[models.Linear] = _in_place_layers(model, in_place_min_bytes) if grads_in_place else []
        if self.alone:
            kept = [p for m in self.in_place for p in m.parameters(recurse=False)]
            _grads_into(kept, torch.zeros(sum(p.numel() for p in kept), dtype=dtype, device=device))
            kept_ids = {id(p) for p in kept}
            self.stolen = [p for p in params if id(p) not in kept_ids]  # autograd's own tensors
            self.flat = torch.zeros(TAIL, dtype=dtype, device=device)  # the tail only
            self.n, self.grads = 0, None
        else:  # the communicator may hand out memory it sums faster (shared memory): collective
            self.flat = comm.grad_buffer(total + TAIL, dtype, device) if comm is not None else \
                torch.zeros(total + TAIL, dtype=dtype, device=device)
            self.n = total
            self.grads = self.flat[:total]
            where = _grads_into(params, self.flat)  # backward accumulates there in place
            owned = sorted(where[p] for m in self.in_place for p in m.parameters(recurse=False))
            self._cleared = _gaps(owned, total + TAIL)  # where backward accumulates, and the tail
        self.tail = self.flat[self.n:]
        self._tail_np = self.tail.numpy() if self.tail.device.type == "cpu" else None
        self.nbytes = (total + TAIL) * self.flat.element_size()

    def zero(self) -> None:
        """Clear gradients and stats; replaces optimizer.zero_grad(), which would drop the views."""
        if self.alone:
            for p in self.stolen:
                p.grad = None
        else:
            for lo, hi in self._cleared:
                self.flat[lo:hi].zero_()
        for layer in self.in_place:
            layer.grads_written = False

    def loss_scale(self, count: int) -> float:
        """What to multiply this step's summed loss by before backward: 1 / count in a world
        of one (its count is the global one), else 1 (sync divides by the summed count)."""
        return 1.0 / count if self.alone and count else 1.0

    def sync(self, comm, count: int, loss_sum: torch.Tensor | float, correct: torch.Tensor | int,
             more: bool, times=(0.0,) * len(TIMES), idle=None) -> StepStats:
        """Sum gradients and stats over all workers, then average the gradients.
        `times`: this worker's seconds of its previous step (TIMES), summed along.
        `idle()`: work to do while waiting for slower workers, if the transport can."""
        for layer in self.in_place:
            if not layer.grads_written:  # backward did not reach it: zeros, as a cleared buffer holds
                for p in layer.parameters(recurse=False):
                    p.grad.zero_()
        tail = self.tail
        if self._tail_np is not None:  # CPU: plain stores into the buffer, no tensor op per value
            loss_sum, correct = float(loss_sum), int(correct)
            bad = 0.0 if math.isfinite(loss_sum) else 1.0
            self._tail_np[:] = (count, loss_sum, correct, 1.0 if more else 0.0, bad,
                                bad * (1 << comm.rank) if comm.rank < MASK_RANKS else 0.0, *times)
        else:  # stays on the device: no sync before the collective
            tail[6:] = torch.tensor(times, dtype=tail.dtype)
            tail[0] = count
            tail[1] = loss_sum
            tail[2] = correct
            tail[3] = 1.0 if more else 0.0
            if isinstance(loss_sum, torch.Tensor):
                bad = torch.logical_not(torch.isfinite(loss_sum)).to(tail.dtype)
                tail[4] = bad
                tail[5] = bad * float(1 << comm.rank) if comm.rank < MASK_RANKS else 0.0
            else:
                tail[4:6] = 0.0
        if self.alone:  # a parameter backward did not reach gets zeros, as the views would hold
            for p in self.stolen:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        else:
            comm.allreduce_mean(self.flat, self.n, idle)  # dist: the one collective of a training step
        summed = self._tail_np if self._tail_np is not None else tail
        total, loss, right, more_any, bad_workers, mask, *summed_times = summed.tolist()
        if bad_workers:
            ranks = tuple(r for r in range(MASK_RANKS) if int(mask) >> r & 1)
            return StepStats(int(round(total)), float("nan"), 0, more_any > 0.5, int(round(bad_workers)), ranks,
                             tuple(summed_times))
        return StepStats(int(round(total)), loss / total if total else 0.0, int(round(right)), more_any > 0.5,
                         times=tuple(summed_times))


def _grads_into(params: list, buf: torch.Tensor) -> dict:
    """Make each parameter's `.grad` a view into `buf`, one after another; where each lies."""
    offset, where = 0, {}
    for p in params:
        p.grad = buf[offset:offset + p.numel()].view_as(p)
        where[p] = (offset, offset + p.numel())
        offset += p.numel()
    return where


def _in_place_layers(model: nn.Module, min_bytes: int) -> list:
    """The model's `models.Linear` layers with weights of `min_bytes` or more whose
    parameters are trained and belong to no other module (a shared parameter also gets
    gradients from autograd), switched on."""
    owners = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    layers = [m for m in model.modules() if isinstance(m, models.Linear)
              and m.weight.numel() * m.weight.element_size() >= min_bytes
              and all(p.requires_grad and owners[id(p)] == 1 for p in m.parameters(recurse=False))]
    for layer in layers:
        layer.grads_in_place, layer.grads_written = True, False
    return layers


def _gaps(ranges: list[tuple[int, int]], end: int) -> list[tuple[int, int]]:
    """[0, end) less the sorted, disjoint `ranges`, as merged ranges."""
    gaps, at = [], 0
    for lo, hi in ranges:
        if lo > at:
            gaps.append((at, lo))
        at = max(at, hi)
    if at < end:
        gaps.append((at, end))
    return gaps


BROADCAST_CHUNK = 4 << 20  # bytes: tensors this large go in place, smaller ones packed into flat chunks


def broadcast_parameters(comm, model: nn.Module, root: int = 0) -> None:
    """Make every worker's parameters and floating buffers equal to root's: large tensors in
    place, small ones packed into chunks of at most BROADCAST_CHUNK bytes, so no flat copy of
    the whole model is made (the wide MLP's 80 MB showed in every rank's peak RSS)."""
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    if comm.world_size == 1 or not tensors:
        return
    pack: list[torch.Tensor] = []

    def flush():
        if pack:
            flat = torch.cat([t.reshape(-1) for t in pack])
            comm.broadcast(flat, root)  # dist: everyone starts from rank 0's weights
            offset = 0
            for t in pack:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
            pack.clear()

    with torch.no_grad():
        for t in (t.detach() for t in tensors):
            if t.is_contiguous() and t.nbytes >= BROADCAST_CHUNK:
                comm.broadcast(t, root)
                continue
            if pack and (t.dtype != pack[0].dtype or sum(q.nbytes for q in pack) + t.nbytes > BROADCAST_CHUNK):
                flush()
            pack.append(t)
        flush()


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # an integer type of each float's size


def parameter_checksums(comm, model: nn.Module) -> list[float]:
    """Every worker's checksum of its parameters, the same list everywhere: their bytes
    summed as 64-bit integers (wrapping, so exact in any order: any one changed bit changes
    it), one pass with no float64 copy (the wide MLP's 80 MB: ~4 ms, was 235 ms every
    comm.check_every_steps steps; the MLP's 2.7 MB: 4.7 -> ~0.2 ms)."""
    total = 0
    with torch.no_grad():
        for p in model.parameters():
            total += _bits_sum(p.detach().reshape(-1))
    sums = torch.zeros(comm.world_size, dtype=torch.float64)
    sums[comm.rank] = float(total % (1 << 52))  # exact in a float64
    comm.allreduce(sums)  # dist: compare parameters across workers
    return sums.tolist()


def _bits_sum(flat: torch.Tensor) -> int:
    """The bytes of a flat tensor summed as int64 words (the last partial word by elements)."""
    size = flat.element_size()
    whole = flat.numel() * size // 8 * 8 // size  # elements that fill whole 8-byte words
    total = 0
    if whole:
        try:
            total += int(flat[:whole].view(torch.int64).sum())
        except RuntimeError:  # storage not 8-byte aligned (a view into another tensor): element by element
            whole = 0
    if whole < flat.numel():
        total += int(flat[whole:].view(_BITS[size]).sum(dtype=torch.int64))
    return total
