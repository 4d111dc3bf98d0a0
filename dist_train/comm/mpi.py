"""MPI through mpi4py: the one module that imports it.

Uppercase (buffer) calls: a contiguous CPU tensor goes to MPI without a copy. GPU
tensors never reach it: gpu.ByDevice sends them to NCCL, or stages them through a pinned
host buffer. MPI has no timeout of its own: the watchdog (watchdog.py) ends a job whose
rank stalls or leaves.
"""

from __future__ import annotations

import sys

from mpi4py import MPI

from .base import Communicator
from .env import Environment


class MPIComm(Communicator):
    """A Communicator (rank, world_size, allreduce, broadcast, close) over an MPI communicator."""

    def __init__(self, comm=MPI.COMM_WORLD):
        self._comm = comm
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()

    def allreduce(self, buf):
        self._comm.Allreduce(MPI.IN_PLACE, buf)

    def broadcast(self, buf, root=0):
        self._comm.Bcast(buf, root=root)

    def close(self):
        if self._comm not in (MPI.COMM_WORLD, MPI.COMM_NULL):
            self._comm.Free()
            self._comm = MPI.COMM_NULL


def world() -> MPIComm:
    return MPIComm(MPI.COMM_WORLD)


def environment() -> Environment:
    """Where this rank is, from MPI itself (its host's ranks: COMM_TYPE_SHARED)."""
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return Environment("mpi", comm.Get_rank(), comm.Get_size(), local.Get_rank(), local.Get_size())
    finally:
        local.Free()


def split(comm: MPIComm, groups: list[list[int]]) -> MPIComm | None:
    """The sub-communicator of the group holding this rank (None if none does). Collective."""
    mine = next((i for i, g in enumerate(groups) if comm.rank in g), None)
    sub = comm._comm.Split(MPI.UNDEFINED if mine is None else mine, key=comm.rank)
    return None if sub == MPI.COMM_NULL else MPIComm(sub)


def abort(code: int = 1) -> None:
    """End every rank of the job now (mpirun then exits non-zero)."""
    sys.stdout.flush()
    sys.stderr.flush()
    MPI.COMM_WORLD.Abort(code)
