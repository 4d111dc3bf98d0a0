"""Where a worker is: one detection function per launch kind, each answering rank, world
size, local rank and size, and (for torch.distributed) a rendezvous address and port.

    local()      a world of one
    mpirun()     Open MPI, MPICH / Hydra or PMIx, from the variables they set
    torchrun()   RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    slurm()      srun without mpirun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODELIST
    detect()     the first of torchrun, mpirun, slurm that applies, else local

A Spark barrier task's environment comes from its BarrierTaskContext, in the Spark
launcher (the only place that imports pyspark); the MPI launcher asks MPI itself
(mpi.environment()).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class Environment:
    kind: str = "local"  # local | mpi | torchrun | slurm | spark
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_size: int = 1
    address: str | None = None  # where rank 0 listens for the torch.distributed rendezvous
    port: int | None = None
    hosts: tuple | None = None  # every rank's host, where the launcher knows it (else exchanged)
    own_address: str | None = None  # where peers reach this worker (its watchdog), if known
    store_running: bool = False  # a store already listens at address:port (torchrun's agent): join it


def local() -> Environment:
    return Environment()


def _int(environ: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        if environ.get(name, "").strip().lstrip("-").isdigit():
            return int(environ[name])
    return None


def mpirun(environ: Mapping[str, str] = os.environ) -> Environment | None:
    """Open MPI (OMPI_COMM_WORLD_*), MPICH / Hydra and srun --mpi=pmi2 (PMI_*), PMIx
    (PMIX_RANK; the size from Open MPI's variables, or srun's under srun --mpi=pmix)."""
    rank = _int(environ, "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
    size = _int(environ, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")
    if rank is None or size is None:
        return None
    local_rank = _int(environ, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")
    local_size = _int(environ, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS") or _tasks_per_node(environ)
    return Environment("mpi", rank, size, local_rank or 0, local_size or 1)


def _tasks_per_node(environ: Mapping[str, str]) -> int | None:
    per_node = re.match(r"\d+", environ.get("SLURM_TASKS_PER_NODE", ""))
    return int(per_node.group()) if per_node else None


def torchrun(environ: Mapping[str, str] = os.environ) -> Environment | None:
    rank, size = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
    if rank is None or size is None or "MASTER_ADDR" not in environ:
        return None
    return Environment("torchrun", rank, size, _int(environ, "LOCAL_RANK") or 0,
                       _int(environ, "LOCAL_WORLD_SIZE") or 1, environ["MASTER_ADDR"],
                       _int(environ, "MASTER_PORT") or 29500,
                       store_running=environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true")


def slurm(environ: Mapping[str, str] = os.environ) -> Environment | None:
    rank, size = _int(environ, "SLURM_PROCID"), _int(environ, "SLURM_NTASKS")
    nodes = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if rank is None or size is None or not nodes:
        return None
    job = _int(environ, "SLURM_JOB_ID") or 0
    port = _int(environ, "MASTER_PORT") or 15000 + job % 20000  # the same on every task of the job
    return Environment("slurm", rank, size, _int(environ, "SLURM_LOCALID") or 0, _tasks_per_node(environ) or 1,
                       environ.get("MASTER_ADDR") or first_host(nodes), port)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[07-09,12],cpu1' -> 'gpu07'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def detect(environ: Mapping[str, str] = os.environ) -> Environment:
    """Where this process is: torchrun's variables first (they are the most specific), then
    mpirun's, then srun's, else a world of one."""
    for probe in (torchrun, mpirun, slurm):
        found = probe(environ)
        if found is not None:
            return found
    return local()
