"""The device layer and the thread budget of one worker."""

from __future__ import annotations

import os

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


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda (one GPU per local worker, round robin) when present, else cpu."""
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device", f"{spec} asked for, but torch sees no CUDA device (use cpu or auto)")
    count = torch.cuda.device_count()
    if spec.startswith("cuda:"):
        index = int(spec[5:])
        if index >= count:
            raise ConfigError("device", f"{spec} asked for, but only {count} CUDA device(s) exist")
        return torch.device(spec)
    return torch.device("cuda", local_rank % count)
