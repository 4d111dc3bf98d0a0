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

from dist_train import gradsync, shm  # noqa: E402

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
model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 3))  # 4 MB: in place; the rest packed
model.register_buffer("stats", torch.zeros(2, dtype=torch.float64))
with torch.no_grad():
    for t in model.state_dict().values():
        t.fill_(rank + 1.0)
gradsync.broadcast_parameters(comm, model)  # rank 0's: 1.0 everywhere
out["broadcast"] = sorted({v for t in model.state_dict().values() for v in (t.min().item(), t.max().item())})
comm.close()
results = world.gather(out)
if rank == 0:
    print(json.dumps(results))
