"""The device layer: which device a worker computes on, its thread budget, and its heap.

`choose` is a pure function of what a worker can know of where it is: the `device`
setting, its local rank and the number of workers on its host, CUDA_VISIBLE_DEVICES,
the GPUs Spark assigned its task (TaskContext.resources()["gpu"]) or the pool its host
offers, and the number of devices torch sees. One GPU per local worker; sharing one
(round robin) only when asked (`comm.share_gpus`). `for_worker` reads those inputs from
this process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import ConfigError


def host_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def thread_budget(local_workers: int, cores: int | None = None, override: int | None = None,
                  data_workers: int = 0) -> int:
    """Torch threads per worker: the cores given, shared by the workers on this host, less
    one for each of its data processes (`data.workers`, one thread each), at least one
    (or `override`, the config's `threads`)."""
    if override:
        return override
    cores = host_cores() if cores is None else cores
    return max(1, cores // max(1, local_workers) - data_workers)


def set_threads(n: int) -> int:
    torch.set_num_threads(n)
    return torch.get_num_threads()


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
HEAP_MMAP_BYTES = 32 << 20  # allocations up to this come from the heap (glibc's largest mmap threshold)
HEAP_TRIM_BYTES = 64 << 20  # free heap kept, not given back to the kernel


def keep_heap() -> None:
    """A training process's heap (glibc): allocations up to 32 MB come from it, and up to
    64 MB of it freed are kept rather than given back to the kernel, so a step's
    activations and gradients reuse the previous step's pages. glibc's default decides
    from what the process freed before: a Spark task's Python worker (forked from Spark's
    daemon) mapped each of LeNet's ~1 MB activations afresh and took 10-90k page faults a
    second (~1-2 ms of its 10 ms step), where MPI ranks (UCX's allocator), local mode and
    torchrun took none. It holds for the whole process (a notebook's, where fit runs in
    it) and is not undone. No-op without glibc."""
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_BYTES)
    mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_BYTES)


@dataclass(frozen=True)
class Choice:
    """A worker's device, whether another worker of its host computes on the same GPU
    (`shared`: then no NCCL between them), and how it was chosen, for the log."""

    device: torch.device
    shared: bool = False
    why: str = ""

    def __str__(self) -> str:
        return f"{self.device} ({self.why})" if self.why else str(self.device)


CPU = Choice(torch.device("cpu"), why="")


def choose(spec: str, *, local_rank: int = 0, local_size: int = 1, count: int = 0, visible: str | None = None,
           assigned: Sequence[str] | None = None, pool: Sequence[str] | None = None, share: bool = False) -> Choice:
    """The device of one worker.

    spec        the `device` setting: auto | cpu | cuda | cuda:N
    local_rank  this worker's index among the `local_size` workers of its host
    count       CUDA devices torch sees (torch.cuda.device_count(), after CUDA_VISIBLE_DEVICES)
    visible     CUDA_VISIBLE_DEVICES as set for this process (None: unset); GPU addresses
                given as physical indices are looked up in it
    assigned    the GPU addresses Spark assigned this task (a cluster with GPU scheduling);
                an empty list: Spark assigned it none
    pool        the GPU addresses this host's workers share out (a local Spark master: the
                driver's GPUs); None: every device torch sees
    share       comm.share_gpus: more local workers than GPUs take them round robin

    ConfigError (one line) where the setting cannot be met."""
    if spec == "cpu":
        return CPU
    if count == 0:
        if spec == "auto":
            return Choice(torch.device("cpu"), why="no CUDA device")
        seen = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise ConfigError("device", f"{spec} asked for, but torch sees no CUDA device{seen}: use cpu or auto")
    if assigned is not None:  # a Spark task: the GPU Spark scheduled for it, never another
        if spec.startswith("cuda:"):
            raise ConfigError("device", f"{spec}: a Spark task uses the GPU Spark assigned it: use cuda or auto")
        if not assigned:
            if spec == "auto":
                return Choice(torch.device("cpu"), why="Spark assigned this task no GPU")
            raise ConfigError("device", "cuda asked for, but Spark assigned this task no GPU: set "
                                        "spark.task.resource.gpu.amount and spark.executor.resource.gpu.amount")
        index = ordinal(assigned[0], visible, count)
        return Choice(torch.device("cuda", index), why=f"Spark GPU {assigned[0]}" + _physical(index, visible))
    if spec.startswith("cuda:"):
        index = int(spec[5:])
        if index >= count:
            raise ConfigError("device", f"{spec} asked for, but torch sees {count} CUDA device(s)")
        if local_size > 1 and not share:
            raise ConfigError("device", f"{spec}: all {local_size} workers of this host would use it: set device: "
                                        f"cuda (one GPU each) or comm.share_gpus: true")
        return Choice(torch.device("cuda", index), shared=local_size > 1, why="as set" + _physical(index, visible))
    gpus = list(pool) if pool is not None else [str(i) for i in range(count)]
    if not gpus:
        if spec == "auto":
            return Choice(torch.device("cpu"), why="no GPU in this host's pool")
        raise ConfigError("device", "cuda asked for, but this host offers no GPU")
    if local_size > len(gpus) and not share:
        if spec == "auto":  # auto never shares a GPU unasked: the CPU, and why
            return Choice(torch.device("cpu"), why=f"{local_size} workers on this host, {len(gpus)} GPU(s); "
                                                   f"comm.share_gpus: true shares them")
        raise ConfigError("device", f"{spec}: {local_size} workers on this host but {len(gpus)} GPU(s)"
                                    f"{_seen(visible)}: start at most {len(gpus)} per host, set comm.share_gpus: "
                                    f"true (round robin), or use device: cpu")
    address = gpus[local_rank % len(gpus)]
    index = ordinal(address, visible, count) if pool is not None else int(address)
    why = f"local rank {local_rank} of {local_size}" + _physical(index, visible)
    return Choice(torch.device("cuda", index), shared=local_size > len(gpus), why=why)


def ordinal(address: str, visible: str | None, count: int) -> int:
    """torch's index of the GPU at `address` (Spark's: a physical index, or a UUID). Under
    CUDA_VISIBLE_DEVICES torch counts the listed devices only, so the address is looked up
    there; an address not listed but below the visible count is taken as already relative
    (a container that renumbers its GPUs from 0)."""
    address = address.strip()
    listed = [d.strip() for d in visible.split(",") if d.strip()] if visible is not None else None
    if listed is not None and address in listed and listed.index(address) < count:
        return listed.index(address)
    if address.isdigit() and int(address) < count:
        return int(address)
    raise ConfigError("device", f"GPU {address} was assigned, but torch sees {count} device(s){_seen(visible)}")


def _seen(visible: str | None) -> str:
    return f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""


def _physical(index: int, visible: str | None) -> str:
    listed = [d.strip() for d in visible.split(",") if d.strip()] if visible is not None else []
    return f", physical GPU {listed[index]}" if index < len(listed) and listed[index] != str(index) else ""


def for_worker(cfg, local_rank: int = 0, local_size: int = 1, assigned: Sequence[str] | None = None,
               pool: Sequence[str] | None = None) -> Choice:
    """`choose` with what this process sees (torch's device count, CUDA_VISIBLE_DEVICES)."""
    count = torch.cuda.device_count() if cfg.device != "cpu" and torch.cuda.is_available() else 0
    return choose(cfg.device, local_rank=local_rank, local_size=local_size, count=count,
                  visible=os.environ.get("CUDA_VISIBLE_DEVICES"), assigned=assigned, pool=pool,
                  share=cfg.comm.share_gpus)


def preflight(cfg, local_workers: int = 1, pool: Sequence[str] | None = None) -> None:
    """Before any worker starts (dist-train mpi, a local Spark master): the device setting
    can be met on this host by `local_workers` workers, or one line saying why not."""
    for rank in range(local_workers):
        for_worker(cfg, rank, local_workers, pool=pool)

