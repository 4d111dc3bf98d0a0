"""Shared memory among the workers of one host: `HostShm` wraps any inner communicator
(MPI or torch.distributed) and keeps to the Communicator contract.

- The gradient buffer (`buffer()`): every worker's buffer *is* its slot of one segment,
  so backward writes there and the sum needs no copy in or out (80 MB between two
  processes here: ~5 ms, against ~34 ms for MPI's Allreduce and ~55 ms for gloo's).
  Worker i sums part i of every slot into its own slot, local worker i of every host
  sums that part across hosts through the inner communicator, and copies it into the
  other slots (`SharedGrads`).
- Any other tensor: copied into my slot -> barrier -> sum my 1/size of every slot ->
  barrier -> copied back (`HostAllreduce`), and across hosts by one worker per host.

Barriers spin on counters in the segment's header (x86's total store order makes a
counter visible only after the data written before it); while spinning a worker checks
that its peers are alive and names the one that stalls or dies. A segment is a file in
/dev/shm that is unlinked as soon as every worker has mapped it, so a crash never leaves
it behind.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import platform
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import failures
from ..errors import PeerFailure, first_line
from ..files import alive
from .base import Communicator

HEADER_BYTES = 8192  # counters and pids of up to 256 workers
GRAD_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}  # what SharedGrads sums (through numpy)
SHM_DIR = Path("/dev/shm")


def supported() -> bool:
    """Spinning on counters relies on x86's store order, and on /dev/shm."""
    return platform.machine().lower() in ("x86_64", "amd64") and SHM_DIR.is_dir()


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
                 names: list[str]):
        self.rank, self.size, self.timeout_s, self.names = local_rank, size, timeout_s, names
        header = np.frombuffer(segment, dtype=np.int64, count=HEADER_BYTES // 8)
        self.counters, self.pids = header[:size], header[256:256 + size]
        self.pids[local_rank] = os.getpid()
        self.arrivals = int(self.counters[local_rank])

    def wait(self) -> None:
        """Arrive, and return once every worker has."""
        self.arrivals += 1
        self.counters[self.rank] = self.arrivals
        counters, target = self.counters, self.arrivals
        spins, start = 0, time.monotonic()
        next_check = start
        while counters.min() < target:
            spins += 1
            if spins > 2000:
                time.sleep(0.00002 if spins < 20000 else 0.0005)
                now = time.monotonic()
                if now > next_check:
                    if now - next_check > 1.0:  # this process was paused (the whole job stopped): not waiting
                        start += now - next_check
                    self._check_peers(target, now - start)
                    next_check = now + 0.1

    def _check_peers(self, target: int, waited: float) -> None:
        if failures.DIAGNOSIS:  # the watchdog named the cause: fail with it here, where this worker waits
            raise PeerFailure(failures.DIAGNOSIS[0])
        late = [r for r in range(self.size) if self.counters[r] < target]
        for r in late:
            pid = int(self.pids[r])
            if pid and not alive(pid):
                raise PeerFailure(f"{self.names[r]} exited at step {failures.PROGRESS.step} (pid {pid}) while "
                                  f"{self.names[self.rank]} waited for it")
        if self.timeout_s is not None and waited > self.timeout_s:
            raise PeerFailure(f"{', '.join(self.names[r] for r in late)} did not arrive within {self.timeout_s:g} s "
                              f"(stalled); {self.names[self.rank]} gives up")


class HostAllreduce:
    """Sum of any contiguous CPU tensor over `size` processes of one host, copied through slots."""

    def __init__(self, path: Path, local_rank: int, size: int, slot_bytes: int, create: bool,
                 timeout_s: float | None, names: list[str]):
        self.rank, self.size, self.slot_bytes = local_rank, size, slot_bytes
        self.map = _map_segment(path, HEADER_BYTES + (size + 1) * slot_bytes, create)
        self.arrivals = _Arrivals(self.map, local_rank, size, timeout_s, names)
        self._views: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def _region(self, dtype: torch.dtype):
        if dtype not in self._views:
            per_slot = self.slot_bytes // torch.empty((), dtype=dtype).element_size()
            flat = torch.frombuffer(self.map, dtype=dtype, offset=HEADER_BYTES, count=(self.size + 1) * per_slot)
            self._views[dtype] = (flat[:self.size * per_slot].view(self.size, per_slot), flat[self.size * per_slot:])
        return self._views[dtype]

    def allreduce(self, buf: torch.Tensor) -> None:
        slots, result = self._region(buf.dtype)
        per_slot = slots.shape[1]
        flat = buf.view(-1)
        for start in range(0, flat.numel(), per_slot):
            part = flat[start:start + per_slot]
            n = part.numel()
            slots[self.rank, :n].copy_(part)
            self.arrivals.wait()
            lo, hi = self.rank * n // self.size, (self.rank + 1) * n // self.size
            torch.sum(slots[:, lo:hi], dim=0, out=result[lo:hi])
            self.arrivals.wait()  # the next call's first barrier keeps the result from being overwritten early
            part.copy_(result[:n])

    def broadcast_from(self, buf: torch.Tensor, root: int) -> None:
        """Overwrite buf with local rank `root`'s buf."""
        _, result = self._region(buf.dtype)
        flat = buf.view(-1)
        for start in range(0, flat.numel(), result.numel()):
            part = flat[start:start + result.numel()]
            if self.rank == root:
                result[:part.numel()].copy_(part)
            self.arrivals.wait()
            if self.rank != root:
                part.copy_(result[:part.numel()])
            self.arrivals.wait()


class SharedGrads:
    """The gradient buffers of one host's workers, side by side in one shared segment.

    Each worker's backward writes into its own slot, so summing needs no copy in or out:

        barrier -> worker i sums part i of every slot into its own slot (slot order fixed) ->
        [part i across hosts: `between`] -> copies it into part i of every other slot -> barrier

    Per worker that is reading and writing about 2 S / parts bytes (S the buffer's size),
    where MPI's or gloo's allreduce first copies the buffer into its own transport and
    back. The sum runs in pieces that stay in cache while they are copied, through numpy
    views of the slots (a third of torch's per-call cost on the small pieces of a small
    model; both round every addition IEEE-exactly). The sum goes into the summing worker's
    own slot, not a common one: on this machine's EPYC a cache line that another core wrote
    and then read back cost its owner ~25 ns to write again (in some runs the next step's
    zeroing of 1.3 MB took 0.6 ms instead of 0.1). Workers with local rank >= `parts` own
    no part (hosts with fewer workers set `parts`)."""

    PIECE = 1 << 20  # elements per piece: 4 MB of float32

    def __init__(self, path: Path, local_rank: int, size: int, numel: int, dtype: torch.dtype, create: bool,
                 timeout_s: float | None, names: list[str], parts: int):
        item = torch.empty((), dtype=dtype).element_size()
        stride = -(-numel * item // 4096) * 4096 // item  # page-aligned slots
        self.map = _map_segment(path, HEADER_BYTES + size * stride * item, create)
        self.arrivals = _Arrivals(self.map, local_rank, size, timeout_s, names)
        self.slots = np.frombuffer(self.map, dtype=GRAD_DTYPES[dtype], offset=HEADER_BYTES,
                                   count=size * stride).reshape(size, stride)[:, :numel]
        self.mine = torch.from_numpy(self.slots[local_rank])  # the worker's gradient buffer
        self.others = [slot for r, slot in enumerate(self.slots) if r != local_rank]
        self.rank, self._scratch = local_rank, None
        self.lo = local_rank * numel // parts if local_rank < parts else 0
        self.hi = (local_rank + 1) * numel // parts if local_rank < parts else 0

    def allreduce(self, between=None) -> None:
        """Sum every worker's slot into every slot; `between(part)` sums this worker's part
        (a view of its slot) across hosts, in place."""
        self.arrivals.wait()  # every slot holds its worker's gradients
        for lo in range(self.lo, self.hi, self.PIECE):  # my part, summed into my slot in place, in slot order
            hi = min(lo + self.PIECE, self.hi)
            acc = self._sum_piece(lo, hi)
            if between is None:
                for s in self.others:
                    np.copyto(s[lo:hi], acc)  # while the piece is still in cache
        if between is not None and self.hi > self.lo:
            between(self.mine[self.lo:self.hi])
            mine = self.slots[self.rank, self.lo:self.hi]
            for s in self.others:
                np.copyto(s[self.lo:self.hi], mine)
        self.arrivals.wait()  # every part is in every slot; no one reads another's slot until the next call

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


class HostShm(Communicator):
    """`inner` (over every worker) with the workers of each host summing through shared
    memory; `across` is this worker's communicator with local worker i of every other
    host (part i of the gradients crosses hosts there; part 0's group, the hosts' leaders,
    carries every other tensor), None on one host. Made by `share`."""

    def __init__(self, inner: Communicator, across: Communicator | None, host: list[int], hosts: int, parts: int,
                 token: str, timeout_s: float, slot_bytes: int):
        self.rank, self.world_size = inner.rank, inner.world_size
        self._inner, self._across, self._hosts, self._parts, self._timeout_s = inner, across, hosts, parts, timeout_s
        self._local_rank, self._local_size = host.index(inner.rank), len(host)
        self._names = [f"rank {r}" for r in host]
        self._path = SHM_DIR / f"dist-train-{token}-{host[0]}"  # named by the host's first rank: unique per job
        self._usable, self._local = _open_everywhere(inner, self._local_rank, self._path, lambda create: HostAllreduce(
            self._path, self._local_rank, self._local_size, slot_bytes, create, timeout_s, self._names),
            self._local_size > 1, what=f"{slot_bytes * (self._local_size + 1) / 1e6:,.0f} MB")
        self._grads: SharedGrads | None = None
        self._grad_buffer: torch.Tensor | None = None

    def allreduce(self, buf):
        if self._grad_buffer is not None and _same_memory(buf, self._grad_buffer):
            return self._sum_grads(buf)
        host = buf if buf.device.type == "cpu" else buf.cpu()
        if self._local is not None:
            self._local.allreduce(host)  # dist: sum within the host
        if self._hosts > 1:
            if self._local_rank == 0:
                self._across.allreduce(host)  # dist: the hosts' leaders sum across hosts
            if self._local is not None:
                self._local.broadcast_from(host, 0)
        if host is not buf:
            buf.copy_(host)

    def _sum_grads(self, buf):
        across = self._across if self._local_rank < self._parts else None
        between = None if across is None else across.allreduce
        if self._grads is not None:
            self._grads.allreduce(between)  # dist: within the host, part i across hosts by local worker i
        elif between is not None:
            between(buf)  # the only worker on its host: the whole buffer is its part

    def broadcast(self, buf, root=0):
        self._inner.broadcast(buf, root)

    def close(self):
        self._local = self._grads = self._grad_buffer = None
        if self._across is not None:
            self._across.close()
        self._inner.close()

    def _open_grads(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """This worker's slot of a new gradient segment (the only worker on its host: a buffer
        of its own, summed across hosts whole); a plain buffer, summed as any other tensor,
        if some host could not map its segment (a full /dev/shm: then every worker does)."""
        path = self._path.with_name(self._path.name + "-grads")
        usable, self._grads = _open_everywhere(self._inner, self._local_rank, path, lambda create: SharedGrads(
            path, self._local_rank, self._local_size, numel, dtype, create, self._timeout_s, self._names, self._parts),
            self._local_size > 1, what=_size(self._local_size * numel * GRAD_DTYPES[dtype]().itemsize))
        buf = self._grads.mine if self._grads is not None else torch.zeros(numel, dtype=dtype)
        buf.zero_()
        self._grad_buffer = buf if usable else None
        return buf


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.0f} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:,.0f} kB"


def _open_everywhere(inner: Communicator, local_rank: int, path: Path, open_segment, needed: bool, what: str = ""):
    """Collective over every worker: local rank 0 of each host creates its host's segment;
    if every one could, the others map it; if every one could, it is unlinked (mapped by all,
    nothing is left behind by a crash). (True, the segment or None where none is `needed`),
    or (False, None) on every worker."""
    segment, ok, cause = None, True, "full?"
    if needed and local_rank == 0:
        try:
            segment = open_segment(True)
        except (OSError, ValueError) as e:
            ok, cause = False, first_line(e, 200)
    created = _all_ok(inner, ok)
    if created and needed and local_rank != 0:
        try:
            segment = open_segment(False)
        except (OSError, ValueError) as e:
            ok, cause = False, first_line(e, 200)
    usable = _all_ok(inner, ok) and created
    if segment is not None and local_rank == 0:
        os.unlink(path)
    if not usable and inner.rank == 0:
        print(f"[dist-train] comm.shm: a host could not map its {what} segment in {SHM_DIR} ({cause}); "
              f"every worker sums without it", file=sys.stderr, flush=True)
    return usable, segment if usable else None


def _all_ok(inner: Communicator, ok: bool) -> bool:
    flag = torch.tensor([0.0 if ok else 1.0], dtype=torch.float64)
    inner.allreduce(flag)
    return flag.item() == 0.0


def share(inner: Communicator, split, *, hosts=None, timeout_s: float, slot_bytes: int = 16 << 20,
          token: str | None = None) -> Communicator:
    """`inner` wrapped so that the workers of each host sum through shared memory, or
    `inner` itself where no host has two workers. `hosts[r]`: rank r's host (exchanged
    through `inner` when not given); `split(inner, groups)`: the transport's way to make
    the sub-communicator of this worker's group; `token` names the segments (default: rank
    0's random bits). Collective."""
    hosts = list(hosts) if hosts is not None else _exchange_hosts(inner)
    groups: dict = {}
    for r, h in enumerate(hosts):
        groups.setdefault(h, []).append(r)
    if max(len(g) for g in groups.values()) == 1:
        return inner
    parts = min(len(g) for g in groups.values())  # gradient parts that cross hosts in parallel
    across = split(inner, [sorted(g[i] for g in groups.values()) for i in range(parts)]) if len(groups) > 1 else None
    host = HostShm(inner, across, groups[hosts[inner.rank]], len(groups), parts, token or _token(inner), timeout_s,
                   slot_bytes)
    if host._usable:
        return host
    if across is not None:
        across.close()
    return inner  # some host could not map its segment: every worker goes without


def buffer(comm: Communicator, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """See comm.buffer. Collective: every worker's communicator is built alike."""
    host = comm
    while host is not None and not isinstance(host, HostShm):
        host = getattr(host, "_inner", None)  # through the wrappers of this package (watchdog.Watched)
    if host is None or device.type != "cpu" or dtype not in GRAD_DTYPES:
        return torch.zeros(numel, dtype=dtype, device=device)
    return host._open_grads(numel, dtype)


def _exchange_hosts(inner: Communicator) -> list[int]:
    """Every rank's host, as a hash of its name, through one allreduce."""
    ids = torch.zeros(inner.world_size, dtype=torch.int64)
    ids[inner.rank] = int.from_bytes(hashlib.sha256(socket.gethostname().encode()).digest()[:7], "little") + 1
    inner.allreduce(ids)
    return ids.tolist()


def _token(inner: Communicator) -> str:
    """A name for this job's segments, the same on every worker (rank 0's random bits)."""
    token = torch.from_numpy(np.frombuffer(os.urandom(8), dtype=np.int64).copy())
    inner.broadcast(token)
    return f"{int(token.item()) & (1 << 63) - 1:016x}"


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Is `a` the very tensor memory `b` (the shared gradient buffer)?"""
    return a.data_ptr() == b.data_ptr() and a.numel() == b.numel() and a.dtype == b.dtype
