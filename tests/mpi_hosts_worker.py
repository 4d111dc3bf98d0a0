"""Run under mpirun by test_mpi.py: MPIComm's gradient buffer with the ranks split into
posed 'hosts' (rank % hosts), so the cross-host path runs on one machine. Rank 0 prints
one JSON line: every rank's results."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launchers"))

import torch  # noqa: E402
from mpi import MPI, MPIComm  # noqa: E402

from dist_train import shm  # noqa: E402

world = MPI.COMM_WORLD
hosts = int(sys.argv[1])
rank = world.Get_rank()
comm = MPIComm(world, timeout_s=30, use_shm=True, local=world.Split(rank % hosts, key=rank))
shm.SharedGrads.PIECE = 1000  # several pieces per part
grads = comm.grad_buffer(5006, torch.float32, torch.device("cpu"))
out = {"shared": comm.shared is not None}
for step in range(3):
    grads.zero_()
    grads[:5000] = torch.arange(5000, dtype=torch.float32) * (rank + 1) * (step + 1)
    grads[5000] = 2.0 * (rank + 1)  # this rank's sample count
    comm.allreduce_mean(grads, 5000)
    out[f"step {step}"] = grads[:3].tolist() + [grads[:5000].sum().item(), grads[5000].item()]
other = torch.full((7,), float(rank))
comm.allreduce(other)  # any other tensor: plain MPI
out["other"] = other[0].item()
comm.close()
results = world.gather(out)
if rank == 0:
    print(json.dumps(results))
