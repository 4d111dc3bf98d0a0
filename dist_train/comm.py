"""The parallelization layer: the few collectives the training core needs.

Implementations: `LocalComm` (a world of one, here), `TorchDistComm` (torch.distributed,
used by the Spark launcher, here because it needs only torch) and `MPIComm`
(launchers/mpi.py, the one module that imports mpi4py).
"""

from __future__ import annotations

import os

import torch


class Communicator:
    """rank, world_size, and in-place collectives on flat tensors."""

    rank: int = 0
    world_size: int = 1

    def allreduce(self, buf: torch.Tensor) -> None:
        """Sum `buf` over all workers, in place."""
        raise NotImplementedError

    def allreduce_mean(self, buf: torch.Tensor, count_at: int, idle=None) -> None:
        """Sum `buf` over all workers, then divide buf[:count_at] by the summed buf[count_at]
        (when it is > 0): the gradients by the global sample count behind them. `idle()`,
        if given, is work this worker may do once while it waits for slower workers (the
        next batch), counted in waited_s; a transport that cannot tell waiting apart never
        calls it."""
        self.allreduce(buf)
        divide_by_count(buf, count_at)

    def broadcast(self, buf: torch.Tensor, root: int = 0) -> None:
        """Overwrite `buf` with root's `buf`, in place."""
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def waited_s(self) -> float:
        """Seconds spent so far waiting for slower workers to reach the gradient exchange,
        where the transport can tell it apart from the exchange itself (else 0)."""
        return 0.0

    def grad_buffer(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A zeroed flat buffer for the gradients, whose allreduce may take a faster path
        than any other tensor's (shared memory). Collective: every worker calls it once."""
        return torch.zeros(numel, dtype=dtype, device=device)

    def abort(self, code: int = 1) -> None:
        """End every worker of the job now (never returns)."""
        raise NotImplementedError


class LocalComm(Communicator):
    """A world of one: every collective is the identity (STYLE.md 1)."""

    def allreduce(self, buf):
        pass

    def broadcast(self, buf, root=0):
        pass

    def barrier(self):
        pass

    def abort(self, code=1):
        raise SystemExit(code)


class TorchDistComm(Communicator):
    """torch.distributed over an already initialised process group (gloo or NCCL)."""

    def __init__(self):
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def allreduce(self, buf):
        self._dist.all_reduce(buf)

    def broadcast(self, buf, root=0):
        self._dist.broadcast(buf, src=root)

    def barrier(self):
        self._dist.barrier()

    def abort(self, code=1):
        os._exit(code)  # peers see 'connection closed' and fail at their next collective


class SharedGradsMixin:
    """The gradient buffer of the workers of one host in shared memory (shm.SharedGrads),
    for MPIComm and HostLocalComm: summed there, part i across hosts by local worker i of
    every host (`_across_hosts`, None where this worker carries no part). The class using
    it sets local_rank, local_size, hosts and, before each exchange, may count it (`_enter`)."""

    shared = grads = None
    hosts = 1

    def _enter(self) -> None:
        pass

    def _open_grads(self, path, numel, dtype, device, timeout_s, names, parts, all_ok) -> torch.Tensor:
        """grad_buffer's shared-memory case (collective over every worker)."""
        from . import shm

        self.shm_path, self.agree = path, all_ok  # for hoststep's parameter segment
        usable, self.shared = False, None  # a dtype it cannot sum: the same on every worker, all skip it
        if dtype in shm.GRAD_DTYPES:
            usable, self.shared = shm.open_shared_grads(path, self.local_rank, self.local_size, numel, dtype,
                                                        timeout_s, names, parts, all_ok)
        if not usable:
            return Communicator.grad_buffer(self, numel, dtype, device)
        # the only worker on its host keeps a plain buffer: its part is the whole of it
        self.grads = self.shared.mine if self.shared is not None else Communicator.grad_buffer(self, numel, dtype,
                                                                                                  device)
        self.grads.zero_()
        return self.grads

    def waited_s(self) -> float:
        return self.shared.waited if self.shared is not None else 0.0

    def allreduce_mean(self, buf, count_at, idle=None):
        if self.grads is None or (buf is not self.grads and not same_memory(buf, self.grads)):
            return super().allreduce_mean(buf, count_at)  # any other tensor: the plain transport
        self._enter()
        between = self._across_hosts
        if self.shared is not None:  # dist: sum within the host; part i across hosts
            self.shared.allreduce(between, count_at if self.hosts == 1 else None, idle)
            if self.hosts == 1:
                return  # one host: divided in the same pass
        elif between is not None:
            between(buf)  # dist: the only worker on its host: the whole buffer is its part
        divide_by_count(buf, count_at)  # each its own slot: the global count arrived with the sum


class HostLocalComm(SharedGradsMixin, TorchDistComm):
    """torch.distributed, except that allreduce sums through shared memory among the
    workers of one host, and crosses hosts with gloo among one leader per host only.
    The gradient buffer lives in shared memory itself (shm.SharedGrads); its parts cross
    hosts in parallel, local worker i of every host summing part i.

    `hosts[r]` is rank r's host; `token` names this job's segments (unique per job)."""

    def __init__(self, hosts: list[str], token: str, timeout_s: float, slot_bytes: int = 16 << 20):
        super().__init__()
        from . import shm

        dist = self._dist
        groups: dict[str, list[int]] = {}
        for r, h in enumerate(hosts):
            groups.setdefault(h, []).append(r)
        mine = groups[hosts[self.rank]]
        leaders = sorted(g[0] for g in groups.values())
        # every rank takes part in creating every group, members or not
        self.leaders = dist.new_group(leaders) if len(leaders) > 1 else None
        self.is_leader = self.rank == mine[0]
        self.local_rank, self.local_size = mine.index(self.rank), len(mine)
        self.parts = min(len(g) for g in groups.values())  # gradient parts that cross hosts in parallel
        self.hosts = len(groups)
        self.cross = None  # this worker's group across hosts: local worker i of every host
        if len(groups) > 1:
            for i in range(self.parts):
                group = dist.new_group(sorted(g[i] for g in groups.values()))
                if i == self.local_rank:
                    self.cross = group
        self._token, self._timeout_s, self._names = token, timeout_s, [f"rank {r}" for r in mine]
        self._leader = mine[0]
        path = shm.SHM_DIR / f"dist-train-{token}-{mine[0]}"
        names = self._names
        if self.is_leader:
            self.local = shm.HostAllreduce(path, 0, len(mine), slot_bytes, True, timeout_s, names)
        dist.barrier()
        if not self.is_leader:
            self.local = shm.HostAllreduce(path, mine.index(self.rank), len(mine), slot_bytes, False, timeout_s,
                                           names)
        dist.barrier()
        if self.is_leader:
            os.unlink(path)  # mapped by every local worker: nothing left behind after a crash

    def grad_buffer(self, numel, dtype, device):
        from . import shm

        if device.type != "cpu":
            return super().grad_buffer(numel, dtype, device)
        return self._open_grads(shm.SHM_DIR / f"dist-train-{self._token}-{self._leader}-grads", numel, dtype, device,
                                self._timeout_s, self._names, self.parts, self._all_ok)

    def _all_ok(self, ok: bool) -> bool:
        flag = torch.tensor([0.0 if ok else 1.0])
        self._dist.all_reduce(flag)
        return flag.item() == 0.0

    @property
    def _across_hosts(self):
        cross = self.cross
        return None if cross is None else (lambda part: self._dist.all_reduce(part, group=cross))

    def allreduce(self, buf):
        host = buf if buf.device.type == "cpu" else buf.cpu()
        self.local.allreduce(host)  # dist: sum within the host
        if self.leaders is not None:
            if self.is_leader:
                self._dist.all_reduce(host, group=self.leaders)  # dist: sum across hosts
            self.local.broadcast_from(host, 0)
        if host is not buf:
            buf.copy_(host)


def same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Is `a` the very tensor memory `b` (the shared gradient buffer)?"""
    return a.data_ptr() == b.data_ptr() and a.numel() == b.numel() and a.dtype == b.dtype


def divide_by_count(buf: torch.Tensor, count_at: int) -> None:
    total = float(buf[count_at])
    if total > 0:
        buf[:count_at].div_(total)
