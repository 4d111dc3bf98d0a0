"""The parallelization layer: the few collectives the training core needs.

Implementations: `LocalComm` (a world of one, here), `TorchDistComm` (torch.distributed,
used by the Spark launcher, here because it needs only torch) and `MPIComm`
(launchers/mpi.py, the one module that imports mpi4py).
"""

from __future__ import annotations

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
        import os

        os._exit(code)  # peers see 'connection closed' and fail at their next collective
