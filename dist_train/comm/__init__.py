"""The parallelization layer: the only thing the training core knows of its peers.

A `Communicator` is rank, world_size, allreduce(tensor) (a sum, in place),
broadcast(tensor, root) and close(): nothing else, and nothing reaches past it.

    LocalComm                  a world of one: every collective is the identity
    mpi.MPIComm                MPI (mpi4py: the one module that imports it)
    torchdist.TorchDistComm    torch.distributed (gloo on the CPU) from (address, port, rank, world)
    shm.HostShm                wraps either: the workers of one host sum through shared memory,
                               the inner communicator carries only what crosses hosts
    watchdog.Watched           wraps the outermost: a heartbeat ring that ends the job when a
                               worker stalls, freezes or leaves, whatever the transport

`connect(env)` turns an environment (env.py: where this worker is) into that stack.
"""

from .base import Communicator, LocalComm
from .env import Environment
from .factory import broadcast_bytes, buffer, connect

__all__ = ["Communicator", "Environment", "LocalComm", "broadcast_bytes", "buffer", "connect"]
