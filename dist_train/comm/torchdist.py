"""torch.distributed from (address, port, rank, world), for any launcher: rank 0 holds a
TCPStore at the address (or the launcher does: torchrun's agent, the Spark driver under a
local master), the others connect to it, and all join one process group (gloo on the
CPU). The store stays open while the group lives.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch.distributed as dist

from .base import Communicator

MARGIN_S = 5.0  # a collective's own timeout, after the watchdog's: it names the rank first


class TorchDistComm(Communicator):
    """A Communicator over a torch.distributed process group (the default one, or `group`)."""

    def __init__(self, group=None, keep=()):
        self._group, self._keep = group, list(keep)  # keep: the store, for as long as the group lives
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._ranks = None if group is None else dist.get_process_group_ranks(group)

    def allreduce(self, buf):
        dist.all_reduce(buf, group=self._group)

    def broadcast(self, buf, root=0):
        src = root if self._ranks is None else self._ranks[root]  # a group's root is given by its global rank
        dist.broadcast(buf, src=src, group=self._group)

    def close(self):
        if self._group is None and dist.is_initialized():
            dist.destroy_process_group()  # a Spark Python worker is reused: leave no group behind
        self._keep.clear()


def listen(address: str) -> tuple[dist.TCPStore, int]:
    """A store on `address` (rank 0's, or a launcher's that the ranks join), on a free port
    (bound before it is shared: no race)."""
    sock = socket.create_server((address, 0), backlog=128)
    store = dist.TCPStore(address, sock.getsockname()[1], is_master=True, wait_for_workers=False,
                          master_listen_fd=sock.detach())
    return store, store.port


def connect(address: str, port: int, rank: int, world: int, timeout_s: float, store=None,
            backend: str = "gloo", store_running: bool = False, device=None) -> TorchDistComm:
    """Join the process group whose rank 0 listens at address:port (rank 0 may pass the
    store it already opened with `listen`; with `store_running` every rank joins a store
    that already listens there, as torchrun's agent's does); `device`: NCCL's GPU."""
    timeout = timedelta(seconds=timeout_s + MARGIN_S)
    if store is None:
        store = dist.TCPStore(address, port, world, is_master=rank == 0 and not store_running, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, device_id=device)
    return TorchDistComm(keep=[store])


def split(comm: TorchDistComm, groups: list[list[int]]) -> TorchDistComm | None:
    """The group holding this rank (None if none does). Every rank creates every group."""
    mine = None
    for ranks in groups:
        group = dist.new_group(ranks)
        if comm.rank in ranks:
            mine = TorchDistComm(group)
    return mine
