"""The GPU transport: how tensors on a GPU are summed.

    every worker on a GPU of its own     NCCL on the device (a torch.distributed NCCL group:
                                         a new group of the launcher's gloo world, or, under
                                         MPI, a world whose store address rank 0 broadcasts)
    otherwise (a GPU shared, some on     through a pinned host buffer, over the CPU stack
    the CPU, comm.nccl false)            (shared memory within a host, MPI or gloo across)

`for_device` decides it alike on every worker (one vote) and installs `ByDevice` under
the watchdog, which goes on counting every collective: a stalled NCCL peer is named as a
gloo or MPI one is, and NCCL's own timeout (comm.timeout_s + MARGIN_S, async error
handling on) ends a collective the watchdog did not.
"""

from __future__ import annotations

import hashlib
import os
import socket
from datetime import timedelta

import torch

from .base import Communicator


def wants_nccl(on_gpu: list[bool], keys: list[int], nccl: bool) -> bool:
    """NCCL when asked (`nccl`) and every worker is on a GPU (`on_gpu`) no other worker
    computes on (`keys`: each worker's (host, GPU) identity): a pure function of the vote."""
    return nccl and all(on_gpu) and len(set(keys)) == len(keys)


def for_device(comm: Communicator, device: torch.device, *, timeout_s: float,
               nccl: bool = True) -> tuple[Communicator, str]:
    """`comm`, able to sum tensors on `device`, and a line for rank 0's log: every
    worker's device and how GPU tensors travel. Collective: every worker calls it; a
    world of one, or CPU workers everywhere, get `comm` back unchanged."""
    if comm.world_size == 1:
        return comm, ""
    vote = torch.zeros(comm.world_size, 4, dtype=torch.int64)
    vote[comm.rank] = torch.tensor([1 if device.type == "cuda" else 0, _gpu_key(device), device.index or 0,
                                    int(nccl)])
    comm.allreduce(vote)  # dist: where every worker computes (and whether all allow NCCL: decided alike)
    on_gpu, keys = [bool(v) for v in vote[:, 0].tolist()], vote[:, 1].tolist()
    if not any(on_gpu):
        return comm, ""
    use_nccl = wants_nccl(on_gpu, keys, all(vote[:, 3].tolist()))
    gpu = nccl_comm(comm, device, timeout_s) if use_nccl else None
    routed = ByDevice(getattr(comm, "_inner", comm), gpu)
    line = describe(on_gpu, vote[:, 2].tolist(), use_nccl)
    if hasattr(comm, "_inner"):  # under the watchdog (watchdog.Watched): it keeps counting the collectives
        comm._inner = routed
        return comm, line
    return routed, line


def describe(on_gpu: list[bool], index: list[int], nccl: bool, most: int = 16) -> str:
    """'devices by rank cuda:0 cuda:1 ..., gradients over NCCL' (the first `most` ranks)."""
    names = [f"cuda:{i}" if g else "cpu" for g, i in zip(on_gpu, index)]
    shown = " ".join(names[:most]) + (f" ... ({len(names)} ranks)" if len(names) > most else "")
    how = "over NCCL" if nccl else "staged through pinned host memory"
    return f"devices by rank {shown}; GPU gradients {how}"


class ByDevice(Communicator):
    """CPU tensors to the CPU stack; GPU tensors to NCCL (`gpu`), or, without it, through
    a pinned host buffer and the CPU stack. It hides the CPU stack from shm.buffer (no
    `_inner`): in a world with a GPU, no worker's gradients live in shared memory, so the
    collective that opens them is skipped alike everywhere."""

    def __init__(self, cpu: Communicator, gpu: Communicator | None):
        self.cpu, self.gpu = cpu, gpu
        self.rank, self.world_size = cpu.rank, cpu.world_size
        self._staging: dict = {}

    def allreduce(self, buf):
        self._route("allreduce", buf)

    def broadcast(self, buf, root=0):
        self._route("broadcast", buf, root)

    def _route(self, op: str, buf: torch.Tensor, *args) -> None:
        if buf.device.type == "cpu":
            getattr(self.cpu, op)(buf, *args)
        elif self.gpu is not None:
            getattr(self.gpu, op)(buf, *args)
        else:
            host = self._stage(buf)
            getattr(self.cpu, op)(host, *args)
            buf.copy_(host)

    def _stage(self, buf: torch.Tensor) -> torch.Tensor:
        """`buf`'s values in a pinned host tensor kept for its shape (the gradients: one a step)."""
        key = (buf.numel(), buf.dtype)
        host = self._staging.get(key)
        if host is None:
            host = self._staging[key] = torch.empty(buf.numel(), dtype=buf.dtype, pin_memory=True)
        host.copy_(buf.reshape(-1))
        return host.view(buf.shape)

    def close(self):
        try:
            if self.gpu is not None:
                self.gpu.close()
        finally:
            self.cpu.close()


def nccl_comm(comm: Communicator, device: torch.device, timeout_s: float) -> Communicator:
    """A torch.distributed NCCL communicator of the same ranks as `comm`. Collective.

    Where the launcher already joined a torch.distributed world (torchrun, srun, Spark:
    gloo), an NCCL group of it; else (MPI) a world of its own: rank 0 listens, and its
    address travels over `comm`."""
    import torch.distributed as dist

    from . import torchdist
    from .factory import broadcast_bytes
    from .watchdog import own_address

    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a failed collective ends the process
    torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s + torchdist.MARGIN_S)
    if dist.is_initialized():
        return torchdist.TorchDistComm(dist.new_group(backend="nccl", timeout=timeout))
    store, where = None, ""
    if comm.rank == 0:
        address = own_address()
        store, port = torchdist.listen(address)
        where = f"{address}:{port}"
    host, port = broadcast_bytes(comm, where.encode()).decode().rsplit(":", 1)
    return torchdist.connect(host, int(port), comm.rank, comm.world_size, timeout_s, store=store, backend="nccl",
                             device=device)


def _gpu_key(device: torch.device) -> int:
    """This worker's (host, GPU) as 62 bits: the GPU's UUID where torch tells it."""
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    gpu = str(getattr(props, "uuid", device.index))
    digest = hashlib.sha256(f"{socket.gethostname()}/{gpu}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2
