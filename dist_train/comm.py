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

    def broadcast(self, buf: torch.Tensor, root: int = 0) -> None:
        """Overwrite `buf` with root's `buf`, in place."""
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

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


class HostLocalComm(TorchDistComm):
    """torch.distributed, except that allreduce sums through shared memory among the
    workers of one host, and crosses hosts with gloo among one leader per host only.

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
        # every rank takes part in creating the leaders' group, members or not
        self.leaders = dist.new_group(leaders) if len(leaders) > 1 else None
        self.is_leader = self.rank == mine[0]
        path = shm.SHM_DIR / f"dist-train-{token}-{mine[0]}"
        names = [f"rank {r}" for r in mine]
        if self.is_leader:
            self.local = shm.HostAllreduce(path, 0, len(mine), slot_bytes, True, timeout_s, names)
        dist.barrier()
        if not self.is_leader:
            self.local = shm.HostAllreduce(path, mine.index(self.rank), len(mine), slot_bytes, False, timeout_s,
                                           names)
        dist.barrier()
        if self.is_leader:
            os.unlink(path)  # mapped by every local worker: nothing left behind after a crash

    def allreduce(self, buf):
        host = buf if buf.device.type == "cpu" else buf.cpu()
        self.local.allreduce(host)  # dist: sum within the host
        if self.leaders is not None:
            if self.is_leader:
                self._dist.all_reduce(host, group=self.leaders)  # dist: sum across hosts
            self.local.broadcast_from(host, 0)
        if host is not buf:
            buf.copy_(host)
