"""The Communicator contract, and a world of one."""

from __future__ import annotations

import torch


class Communicator:
    """rank, world_size, and in-place collectives on tensors."""

    rank: int = 0
    world_size: int = 1

    def allreduce(self, buf: torch.Tensor) -> None:
        """Sum `buf` over all workers, in place."""
        raise NotImplementedError

    def broadcast(self, buf: torch.Tensor, root: int = 0) -> None:
        """Overwrite `buf` with root's `buf`, in place."""
        raise NotImplementedError

    def close(self) -> None:
        """Leave the world (a clean end: peers are told this worker is done)."""


class LocalComm(Communicator):
    """A world of one (STYLE.md 1)."""

    def allreduce(self, buf):
        pass

    def broadcast(self, buf, root=0):
        pass
