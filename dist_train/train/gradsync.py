"""Gradient averaging, in one place (STYLE.md 5).

Every trainable parameter's `.grad` is a view into one flat buffer, so backward writes
straight into it: no packing before the allreduce, no unpacking after. Behind the
gradients sit a few statistics of the local batch, summed in the same collective:

    [ grads ... | loss sum | samples | the previous step's seconds by kind (TIMES)
                | each metric's (sum, count) | each rank's arrival at the exchange
                | each rank's non-finite flag | the signal each rank was asked to stop with ]

Where the mean is taken: each worker multiplies its summed loss by 1 / (the step's
global sample count) before backward, so the allreduce's sum *is* the mean over the
global batch, exact when local batches differ in size or are empty, and the exchange
is a bare sum with no pass over the gradients after it. The count needs no
communication: it is a pure function of the shard sizes (sharding.step_samples), and
the summed `samples` in the tail checks it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from .. import comm as comms
from .. import models

# a step's seconds by kind: gathering the batch, forward and backward (with clearing the
# gradients), the optimizer step, the exchange once all have arrived, waiting for the last
# to arrive, and the loop's Python between two steps (bookkeeping, logs, checkpoints; not
# held-out evaluations)
TIMES = ("data", "compute", "optimizer", "comm", "wait", "other")
FIXED = 2 + len(TIMES)  # loss sum, samples, and the previous step's seconds (TIMES), summed over workers
# a models.Linear writes its gradients in place from this weight size on: below it the
# Python autograd.Function (~30 us a layer) costs more than the passes it saves. In a
# world of one only where autograd would map a fresh gradient each step: glibc mmaps
# (and the kernel page-faults in) allocations above its largest threshold, 32 MB.
IN_PLACE_MIN_BYTES, IN_PLACE_MIN_BYTES_ALONE = 256 << 10, 32 << 20


@dataclass
class StepStats:
    count: int  # samples in the global batch
    loss: float  # mean loss over the global batch (NaN if a worker's was not finite)
    metrics: tuple[tuple[float, float], ...] = ()  # each metric's (sum, count) over the global batch (logged steps)
    nonfinite_ranks: tuple[int, ...] = ()  # workers whose loss was NaN or Inf
    stop: tuple[tuple[int, int], ...] = ()  # (rank, signal) of each worker asked to stop (preempt.py)
    times: tuple[float, ...] = (0.0,) * len(TIMES)  # the previous step's seconds (TIMES), summed over workers
    waited: float = 0.0  # this worker's wait at the exchange for the last one to arrive


class FusedGrads:
    """Gradients of `model` as views into one flat buffer, with the stats tail.

    `models.Linear` layers write their gradients into the buffer from their own backward
    (`grads_in_place`, off under autocast; layers of `in_place_min_bytes` or more), so
    only the rest of the buffer is cleared each step.

    A world of one (`comm.world_size == 1`) has nothing to sum: there the buffer holds
    only the in-place layers' gradients, the others stay PyTorch's own tensors (cleared
    by dropping them, as zero_grad does), so no pass over the gradients is added to the
    plain loop's (which, for the wide MLP's 64 MB weight, page-faults in a fresh gradient
    every step)."""

    def __init__(self, model: nn.Module, comm, grads_in_place: bool = True, in_place_min_bytes: int | None = None,
                 metrics: int = 0):
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"all trainable parameters must share one dtype, got {sorted(map(str, dtypes))}")
        total, dtype, device = sum(p.numel() for p in params), params[0].dtype, params[0].device
        self.params, self.rank, self.world = params, comm.rank, comm.world_size
        self.alone = self.world == 1
        if in_place_min_bytes is None:
            in_place_min_bytes = IN_PLACE_MIN_BYTES_ALONE if self.alone else IN_PLACE_MIN_BYTES
        self.in_place: list[models.Linear] = _in_place_layers(model, in_place_min_bytes) if grads_in_place else []
        self.metric_slots = 2 * metrics
        tail = FIXED + self.metric_slots + 3 * self.world
        if self.alone:
            kept = [p for m in self.in_place for p in m.parameters(recurse=False)]
            _grads_into(kept, torch.zeros(sum(p.numel() for p in kept), dtype=dtype, device=device))
            kept_ids = {id(p) for p in kept}
            self.stolen = [p for p in params if id(p) not in kept_ids]  # autograd's own tensors
            self.flat = torch.zeros(tail, dtype=dtype, device=device)  # the tail only
            self.n = 0
        else:  # the communicator may hand out memory it sums faster (shared memory): collective
            self.flat = comms.buffer(comm, total + tail, dtype, device)
            self.n = total
            where = _grads_into(params, self.flat)  # backward accumulates there in place
            owned = sorted(where[p] for m in self.in_place for p in m.parameters(recurse=False))
            self._cleared = _gaps(owned, total + tail)  # where backward accumulates, and the tail
        self.tail = self.flat[self.n:]
        self.exact_counts = 2 ** round(1 - math.log2(torch.finfo(dtype).eps))  # counts the tail holds exactly
        self._tail_np = self.tail.numpy() if self.tail.device.type == "cpu" else None
        self._tail_host_t = None  # a device buffer's tail, staged in pinned host memory (_host_tail)
        self.nbytes = (total + tail) * self.flat.element_size()

    def zero(self) -> None:
        """Clear gradients and stats; replaces optimizer.zero_grad(), which would drop the views."""
        if self.alone:
            for p in self.stolen:
                p.grad = None
            self.tail.zero_()
        else:
            for lo, hi in self._cleared:
                self.flat[lo:hi].zero_()
        for layer in self.in_place:
            layer.grads_written = False

    def sync(self, comm, samples: int, loss_sum, metrics=(), times=(0.0,) * len(TIMES),
             arrived: float = 0.0, stop: int = 0) -> StepStats:
        """Sum the (already mean-scaled) gradients and the stats over all workers.
        `samples`, `loss_sum`: this worker's batch; `metrics`: its (sum, count) of each
        metric, flat, or () on a step that logs none; `times`: its seconds of the previous
        step (TIMES); `arrived`: seconds from the step's start to here; `stop`: the signal
        this worker was asked to stop with, 0 if none."""
        for layer in self.in_place:
            if not layer.grads_written:  # backward did not reach it: zeros, as a cleared buffer holds
                for p in layer.parameters(recurse=False):
                    p.grad.zero_()
        loss_sum = float(loss_sum)
        values = (loss_sum if math.isfinite(loss_sum) else 0.0, samples, *times, *metrics)
        # CPU: plain stores into the buffer, no tensor op per value; a GPU: the same into a
        # pinned host tail, copied to the device's in one transfer
        tail = self._tail_np if self._tail_np is not None else self._host_tail()
        tail[:len(values)] = values
        ranks = FIXED + self.metric_slots
        tail[ranks + self.rank] = arrived
        tail[ranks + self.world + self.rank] = 0.0 if math.isfinite(loss_sum) else 1.0
        tail[ranks + 2 * self.world + self.rank] = stop
        if self._tail_np is None:
            self.tail.copy_(self._tail_host_t, non_blocking=True)
        if self.alone:  # a parameter backward did not reach gets zeros, as the views would hold
            for p in self.stolen:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        else:
            comm.allreduce(self.flat)  # dist: the one collective of a training step
        return self._stats(arrived)

    def _host_tail(self):
        """The pinned host copy of a device buffer's tail, zeroed (as zero() clears the device's)."""
        if self._tail_host_t is None:
            self._tail_host_t = torch.zeros(self.tail.numel(), dtype=self.tail.dtype, pin_memory=True)
        self._tail_host_t.zero_()  # the copy of the previous step's is done: its stats were read back
        return self._tail_host_t.numpy()

    def grad_tensors(self) -> list[torch.Tensor]:
        """What holds the gradients this step: the flat buffer's gradient part (a world of
        more), or each parameter's own (a world of one)."""
        if self.alone:
            return [p.grad for p in self.params if p.grad is not None]
        return [self.flat[:self.n]]

    def _stats(self, arrived: float) -> StepStats:
        summed = (self._tail_np if self._tail_np is not None else self.tail.cpu().numpy()).tolist()
        loss, count = summed[0], int(round(summed[1]))
        world, at = self.world, FIXED + self.metric_slots
        metrics = tuple(zip(summed[FIXED:at:2], summed[FIXED + 1:at:2]))
        ranks = tuple(r for r, flag in enumerate(summed[at + world:at + 2 * world]) if flag > 0.5)
        stop = tuple((r, int(round(signum))) for r, signum in enumerate(summed[at + 2 * world:]) if signum > 0.5)
        mean = float("nan") if ranks else (loss / count if count else 0.0)
        waited = max(max(summed[at:at + world]) - arrived, 0.0)
        return StepStats(count, mean, metrics, ranks, stop, tuple(summed[2:FIXED]), waited)


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


def settle_buffers(comm, model: nn.Module) -> None:
    """One set of buffers (BatchNorm's running statistics) on every worker: floating ones
    averaged over the workers (each saw other batches; running means are linear in the
    batches, so this is what one worker seeing them all would hold, up to rounding),
    integer ones (counters) rank 0's. Called before each checkpoint and evaluation, so
    what is saved and scored is the same everywhere, and a resume continues from it."""
    buffers = [b for b in model.buffers()]
    if comm.world_size == 1 or not buffers:
        return
    with torch.no_grad():
        for dtype in sorted({b.dtype for b in buffers}, key=str):
            same = [b for b in buffers if b.dtype == dtype]
            flat = torch.cat([b.detach().reshape(-1) for b in same])
            if dtype.is_floating_point:
                comm.allreduce(flat)  # dist: the sum, then the mean
                flat.div_(comm.world_size)
            else:
                comm.broadcast(flat, 0)  # dist: rank 0's counters
            offset = 0
            for b in same:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
