"""Run under mpirun by test_mpi.py: the MPI communicator stack with its ranks posed as
`hosts` hosts (rank % hosts), so the cross-host path runs on one machine. Rank 0 prints
one JSON line: every rank's results."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dist_train import comm as comms  # noqa: E402
from dist_train.comm import mpi, shm  # noqa: E402
from dist_train.comm.env import Environment  # noqa: E402
from dist_train.train import gradsync  # noqa: E402
from tests.helpers import in_shared_memory  # noqa: E402

world = mpi.world()
hosts = int(sys.argv[1])
rank, n = world.rank, world.world_size
env = Environment("mpi", rank, n, hosts=tuple(f"host{r % hosts}" for r in range(n)))
comm = comms.connect(env, timeout_s=30, shm=True, base=world)
shm.SharedGrads.PIECE = 1000  # several pieces per part
grads = comms.buffer(comm, 5006, torch.float32, torch.device("cpu"))
out = {"shared": in_shared_memory(grads)}
for step in range(3):
    grads.zero_()
    grads[:5000] = torch.arange(5000, dtype=torch.float32) * (rank + 1) * (step + 1)
    grads[5000] = 2.0 * (rank + 1)  # this rank's sample count
    comm.allreduce(grads)
    grads[:5000] /= grads[5000]  # the mean, by the summed count
    out[f"step {step}"] = grads[:3].tolist() + [grads[:5000].sum().item(), grads[5000].item()]
other = torch.full((7,), float(rank))
comm.allreduce(other)  # any other tensor: within the host, then the hosts' leaders
out["other"] = other[0].item()
model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 3))  # 4 MB: in place; the rest packed
model.register_buffer("stats", torch.zeros(2, dtype=torch.float64))
with torch.no_grad():
    for t in model.state_dict().values():
        t.fill_(rank + 1.0)
gradsync.broadcast_parameters(comm, model)  # rank 0's: 1.0 everywhere
out["broadcast"] = sorted({v for t in model.state_dict().values() for v in (t.min().item(), t.max().item())})
results = [None] * n
payload = comms.broadcast_bytes  # gather through the contract: each rank's JSON from each root in turn
for r in range(n):
    results[r] = json.loads(payload(comm, json.dumps(out).encode() if r == rank else b"", root=r).decode())
comm.close()
if rank == 0:
    print(json.dumps(results))
