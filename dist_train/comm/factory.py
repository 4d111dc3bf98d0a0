"""The factory: an environment (env.py) -> the communicator stack of that worker, and the
two helpers every worker's setup uses over the contract."""

from __future__ import annotations

from typing import Callable

import torch

from . import shm as host, watchdog
from .base import Communicator, LocalComm
from .env import Environment


def connect(env: Environment, *, timeout_s: float = 300.0, shm: bool = True,
            fail: Callable[[str], None] | None = None, base: Communicator | None = None,
            store=None) -> Communicator:
    """The communicator of the worker `env` describes: its transport (MPI under mpirun,
    torch.distributed at env's rendezvous address otherwise, or `base` if the launcher
    already joined one), shared memory among the workers of each host (`shm`), and a
    watchdog on every rank (`fail(line)`: how this launcher ends its world when a peer
    stalls or leaves). Collective: every worker calls it."""
    if env.world_size == 1:
        return LocalComm()
    if env.kind == "mpi":
        from . import mpi

        # MPI has no timeout: the watchdog names a stall first, the shared-memory barrier is a backstop
        inner, split, barrier_s, slack_s = base or mpi.world(), mpi.split, timeout_s + 10, 0.0
    else:
        from . import torchdist

        inner = base or torchdist.connect(env.address, env.port, env.rank, env.world_size, timeout_s, store=store,
                                          store_running=env.store_running)
        # gloo times out by itself (timeout_s + MARGIN_S), and the shared-memory barrier names a late peer
        # at timeout_s in the waiting worker's main thread, where its failure reaches the Spark driver; the
        # watchdog acts a second later, for what neither sees (a frozen peer, a peer gone from the ring)
        split, barrier_s, slack_s = torchdist.split, timeout_s, 1.0
    if _everyone(inner, shm and host.supported()):  # decided alike, or the collectives below would not match
        inner = host.share(inner, split, hosts=env.hosts, timeout_s=barrier_s)
    return watchdog.Watched(inner, timeout_s, fail, address=env.own_address, slack_s=slack_s)


def _everyone(comm: Communicator, mine: bool) -> bool:
    """True on every worker if it is true on every worker (a differing config is then
    named by the start agreement, after the communicator is built)."""
    votes = torch.tensor([1.0 if mine else 0.0], dtype=torch.float64)
    comm.allreduce(votes)
    return votes.item() == comm.world_size


def buffer(comm: Communicator, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed flat tensor for the gradients. Where `comm` sums through shared memory it
    lies in this worker's slot of a shared segment, and allreduce of it sums in place
    without a copy in or out (torch's symmetric memory is the same idea). Collective."""
    return host.buffer(comm, numel, dtype, device)


def broadcast_bytes(comm: Communicator, data: bytes, root: int = 0) -> bytes:
    """`root`'s bytes on every worker: their length first (a fixed-size broadcast), then them."""
    size = torch.tensor([len(data)], dtype=torch.int64)
    comm.broadcast(size, root)
    payload = torch.zeros(int(size.item()), dtype=torch.uint8)
    if comm.rank == root and len(data):
        payload.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    comm.broadcast(payload, root)
    return payload.numpy().tobytes()
