"""Allreduce among the workers of one host through shared memory.

Two ways, both over a segment that starts with a header (an arrival counter and pid per
worker):

- `SharedGrads`, for the gradient buffer: every worker's buffer *is* its slot of the
  segment, so backward writes there and the sum needs no copy in or out (80 MB between
  two processes here: ~5 ms, against ~34 ms for MPI's Allreduce and ~55 ms for gloo's).
- `HostAllreduce`, for any other tensor: copy it into my slot -> barrier -> sum my
  1/size of every slot into a result region -> barrier -> copy the result back (the
  next call's first barrier keeps the result region from being overwritten early).

Barriers spin on the counters (x86's total store order makes a counter visible only
after the data written before it); while spinning a worker checks that its peers are
alive and names the one that stalls or dies. A segment is a file in /dev/shm that is
unlinked as soon as every worker has mapped it, so a crash never leaves it behind.
"""

from __future__ import annotations

import mmap
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HEADER_BYTES = 8192  # counters, pids (and, for SharedGrads, sample counts) of up to 256 workers
GRAD_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}  # what SharedGrads sums (through numpy)
SHM_DIR = Path("/dev/shm")


def supported() -> bool:
    """Spinning on counters relies on x86's store order, and on /dev/shm."""
    return platform.machine().lower() in ("x86_64", "amd64") and SHM_DIR.is_dir()


class PeerFailure(RuntimeError):
    """A peer on this host died or stopped arriving."""


def _map_segment(path: Path, nbytes: int, create: bool) -> mmap.mmap:
    """Map the segment at `path`; the creator reserves its pages up front (posix_fallocate),
    so a full /dev/shm is an OSError here, never a SIGBUS when a page is first touched."""
    if create:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
    else:
        fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)


class _Arrivals:
    """A spinning barrier over a segment's header: one arrival counter and pid per worker.

    While it waits it checks that the late workers are alive, and gives up naming them
    when one died or none arrived within `timeout_s`."""

    def __init__(self, segment: mmap.mmap, local_rank: int, size: int, timeout_s: float | None,
                 names: list[str] | None):
        self.rank, self.size, self.timeout_s = local_rank, size, timeout_s
        self.names = names or [f"local rank {r}" for r in range(size)]
        header = np.frombuffer(segment, dtype=np.int64, count=HEADER_BYTES // 8)
        self.counters, self.pids = header[:size], header[256:256 + size]
        self.pids[local_rank] = os.getpid()
        self.arrivals = int(self.counters[local_rank])

    def wait(self, idle=None) -> float | None:
        """Arrive, and return once every worker has; `idle()` runs once first if some have
        not (work that would otherwise follow). Returns the seconds idle() took, None if it
        did not run."""
        self.arrivals += 1
        self.counters[self.rank] = self.arrivals
        counters, target = self.counters, self.arrivals
        if counters.min() >= target:
            return None
        idled = None
        if idle is not None:
            t = time.perf_counter()
            idle()
            idled = time.perf_counter() - t
        spins, start, next_check = 0, time.monotonic(), 0.0
        while counters.min() < target:
            spins += 1
            if spins > 2000:
                time.sleep(0.00002 if spins < 20000 else 0.0005)
                now = time.monotonic()
                if now > next_check:
                    self._check_peers(target, now - start)
                    next_check = now + 0.1
        return idled

    def _check_peers(self, target: int, waited: float) -> None:
        late = [r for r in range(self.size) if self.counters[r] < target]
        for r in late:
            pid = int(self.pids[r])
            if pid and not _alive(pid):
                raise PeerFailure(f"{self.names[r]} (pid {pid}) exited while {self.names[self.rank]} waited for it")
        if self.timeout_s is not None and waited > self.timeout_s:
            raise PeerFailure(f"{', '.join(self.names[r] for r in late)} did not arrive within {self.timeout_s:g} s "
                              f"(stalled); {self.names[self.rank]} gives up")


class HostAllreduce:
    """Sum of any contiguous CPU tensor over `size` processes of one host, copied through slots."""

    def __init__(self, path: Path, local_rank: int, size: int, slot_bytes: int, create: bool,
                 timeout_s: float | None, names: list[str] | None = None):
        self.rank, self.size, self.slot_bytes = local_rank, size, slot_bytes
        self.map = _map_segment(path, HEADER_BYTES + (size + 1) * slot_bytes, create)
        self.arrivals = _Arrivals(self.map, local_rank, size, timeout_s, names)
        self._views: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def _region(self, dtype: torch.dtype):
        if dtype not in self._views:
            item = torch.empty((), dtype=dtype).element_size()
            per_slot = self.slot_bytes // item
            flat = torch.frombuffer(self.map, dtype=dtype, offset=HEADER_BYTES,
                                    count=(self.size + 1) * per_slot)
            self._views[dtype] = (flat[:self.size * per_slot].view(self.size, per_slot), flat[self.size * per_slot:])
        return self._views[dtype]

    def allreduce(self, buf: torch.Tensor) -> None:
        slots, result = self._region(buf.dtype)
        per_slot = slots.shape[1]
        flat = buf.view(-1)
        for start in range(0, flat.numel(), per_slot):
            self._chunk(flat[start:start + per_slot], slots, result)

    def _chunk(self, part: torch.Tensor, slots: torch.Tensor, result: torch.Tensor) -> None:
        n = part.numel()
        slots[self.rank, :n].copy_(part)
        self.barrier()
        lo, hi = self.rank * n // self.size, (self.rank + 1) * n // self.size
        torch.sum(slots[:, lo:hi], dim=0, out=result[lo:hi])
        self.barrier()
        part.copy_(result[:n])

    def broadcast_from(self, buf: torch.Tensor, root: int) -> None:
        """Overwrite buf with local rank `root`'s buf."""
        _, result = self._region(buf.dtype)
        flat = buf.view(-1)
        for start in range(0, flat.numel(), result.numel()):
            part = flat[start:start + result.numel()]
            if self.rank == root:
                result[:part.numel()].copy_(part)
            self.barrier()
            if self.rank != root:
                part.copy_(result[:part.numel()])
            self.barrier()

    def barrier(self) -> None:
        self.arrivals.wait()


class SharedGrads:
    """The gradient buffers of one host's workers, side by side in one shared segment.

    Each worker's backward writes into its own slot, so summing needs no copy in or out:

        barrier -> worker i sums part i of every slot into its own slot (slot order fixed) ->
        [part i across hosts: `between`] -> copies it into part i of every other slot -> barrier

    (With hoststep's split optimizer step, one host only, worker i steps part i itself:
    `set_part` leaves part i in worker i's slot, and only the stats tail is copied.)

    Per worker that is reading and writing about 2 S / parts bytes (S the buffer's size),
    where MPI's or gloo's allreduce first copies the buffer into its own transport and
    back. The sum runs in pieces that stay in cache while they are copied, through numpy
    views of the slots (a third of torch's per-call cost on the small pieces of a small
    model; both round every addition and division the same, IEEE-exactly). The sum goes
    into the summing worker's own slot, not a common one: on this machine's EPYC a cache
    line that another core wrote and then read back cost its owner ~25 ns to write again
    (in some runs the next step's zeroing of 1.3 MB took 0.6 ms instead of 0.1). Workers with
    local rank >= `parts` own no part (hosts with fewer workers set `parts`). `waited`
    counts the seconds spent in the first barrier (waiting for slower workers, not summing)
    and in the idle work of the second."""

    PIECE = 1 << 20  # elements per piece: 4 MB of float32

    def __init__(self, path: Path, local_rank: int, size: int, numel: int, dtype: torch.dtype, create: bool,
                 timeout_s: float | None, names: list[str] | None = None, parts: int | None = None):
        item = torch.empty((), dtype=dtype).element_size()
        stride = -(-numel * item // 4096) * 4096 // item  # page-aligned slots
        self.map = _map_segment(path, HEADER_BYTES + size * stride * item, create)
        self.arrivals = _Arrivals(self.map, local_rank, size, timeout_s, names)
        self.slots = np.frombuffer(self.map, dtype=GRAD_DTYPES[dtype], offset=HEADER_BYTES,
                                   count=size * stride).reshape(size, stride)[:, :numel]
        self.mine = torch.from_numpy(self.slots[local_rank])  # the worker's gradient buffer
        self.others = [slot for r, slot in enumerate(self.slots) if r != local_rank]
        self.rank, self.waited, self._scratch = local_rank, 0.0, None
        self.counts = np.frombuffer(self.map, dtype=np.float64, count=256, offset=4096)[:size]
        parts = size if parts is None else parts
        self.lo = local_rank * numel // parts if local_rank < parts else 0
        self.hi = (local_rank + 1) * numel // parts if local_rank < parts else 0
        self.copy_from = 0  # summed elements below it stay in their summer's slot (hoststep: it steps them)

    def set_part(self, lo: int, hi: int, copy_from: int) -> None:
        """Sum elements [lo, hi) here (every worker of the host sets parts that tile the
        slot, before the first allreduce), and copy only those from `copy_from` on into the
        other slots (one host only)."""
        self.lo, self.hi, self.copy_from = lo, hi, copy_from

    def allreduce(self, between=None, mean_at: int | None = None, idle=None) -> None:
        """Sum every worker's slot into every slot; `between(part)` sums this worker's part
        (a view of its slot) across hosts, in place. With `mean_at` (one host only),
        elements below it are divided by the summed element at it, in the same pass.
        `idle()` runs once, if this worker waits for the others: to arrive, or else to
        finish their parts (its seconds there count as waiting too)."""
        slots = self.slots
        if mean_at is not None:  # in the header: the slots' copies are overwritten by their part's owner
            self.counts[self.rank] = slots[self.rank, mean_at]
        start = time.perf_counter()
        idled = self.arrivals.wait(idle)  # every slot holds its worker's gradients
        self.waited += time.perf_counter() - start
        others = self.others
        total = 0.0
        if mean_at is not None:  # whole numbers: summed exactly, the same float as the summed count
            total = slots.dtype.type(self.counts.sum())
        for lo in range(self.lo, self.hi, self.PIECE):  # my part, summed into my slot in place, in slot order
            hi = min(lo + self.PIECE, self.hi)
            acc = self._sum_piece(lo, hi)
            if total > 0 and lo < mean_at:
                grads = acc[:mean_at - lo]
                np.divide(grads, total, out=grads)
            if between is None and hi > self.copy_from:
                at = max(lo, self.copy_from)
                for s in others:
                    np.copyto(s[at:hi], acc[at - lo:])  # while the piece is still in cache
        if between is not None and self.hi > self.lo:
            between(self.mine[self.lo:self.hi])
            mine = slots[self.rank, self.lo:self.hi]
            for s in others:
                np.copyto(s[self.lo:self.hi], mine)
        # every part is in every slot; no one reads another's slot until the next call. A worker
        # whose part is done before another's runs idle() here, if it did not wait before
        idled = self.arrivals.wait(idle if idled is None else None)
        if idled is not None:
            self.waited += idled

    def _sum_piece(self, lo: int, hi: int) -> np.ndarray:
        """Elements [lo, hi) of every slot summed into my slot as ((s0 + s1) + s2) + ...:
        the same floats whichever worker owns the part."""
        slots, r = self.slots, self.rank
        if r == 0:
            acc = slots[0, lo:hi]
        else:  # partial sums before my slot go to scratch (r > 1) or straight into my slot (r == 1)
            if r > 1 and (self._scratch is None or len(self._scratch) < hi - lo):
                self._scratch = np.empty(min(self.PIECE, self.hi - self.lo), dtype=slots.dtype)
            acc = np.add(slots[0, lo:hi], slots[1, lo:hi], out=slots[1, lo:hi] if r == 1 else self._scratch[:hi - lo])
            for k in range(2, r):
                np.add(acc, slots[k, lo:hi], out=acc)
            if r > 1:
                acc = np.add(acc, slots[r, lo:hi], out=slots[r, lo:hi])
        for k in range(r + 1, len(slots)):
            np.add(acc, slots[k, lo:hi], out=acc)
        return acc


def open_shared_grads(path: Path, local_rank: int, size: int, numel: int, dtype: torch.dtype,
                      timeout_s: float | None, names: list[str], parts: int, all_ok):
    """Collective over every worker of the job: local rank 0 of each host creates its
    host's segment; if all could (`all_ok(flag)`: True on every worker if every worker's
    flag is), the others map it; `all_ok` again; then it is unlinked. A host with one
    worker maps nothing.

    Returns (usable, SharedGrads or None): usable is False on every worker if any of them
    could not create or map its segment (e.g. a full /dev/shm); then all use their plain path."""
    grads, ok = None, True
    if size > 1 and local_rank == 0:
        try:
            grads = SharedGrads(path, 0, size, numel, dtype, True, timeout_s, names, parts)
        except (OSError, ValueError):
            ok = False
    created = all_ok(ok)
    if created and size > 1 and local_rank != 0:
        try:
            grads = SharedGrads(path, local_rank, size, numel, dtype, False, timeout_s, names, parts)
        except (OSError, ValueError):
            ok = False
    usable = all_ok(ok) and created
    if grads is not None and local_rank == 0:
        os.unlink(path)  # mapped by every local worker (or given up): nothing left behind after a crash
    if not usable and names and names[0] == "rank 0":  # said once, by rank 0
        mb = size * numel * torch.empty((), dtype=dtype).element_size() / 1e6
        print(f"[dist-train] comm.shm: a host could not map its {mb:,.0f} MB gradient segment in {SHM_DIR} "
              f"(full?); every worker sums without it", file=sys.stderr, flush=True)
    return (True, grads) if usable else (False, None)


def _alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by its parent, counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
