"""Reference points for scripts/bench.py, written the way a user would by hand with mpi4py
(no dist-train in the loop). Run under mpirun -n 2; rank 0 prints one JSON line.

    mpirun -n 2 python scripts/peers/mpi_ref.py conf/bench_mlp.yaml --mode fused
    --mode fused       flatten the grads, one Allreduce, divide, copy back (the best peer)
    --mode per_tensor  one Allreduce per gradient tensor
    --mode nosync      no exchange at all: the ceiling for data parallelism on these cores
    --mode barrier     no exchange, but the ranks meet at an MPI Barrier after each backward, as
                       any synchronous exchange makes them: the cost of meeting alone (each step
                       waits for the slower rank), which any exchange pays on top of its own
    --mode bare        time one Allreduce of the model's gradient bytes (ms, median): in a
                       loop ("loop_ms"), then in the fused loop between training steps, after
                       a Barrier so not waiting for the other rank ("step_ms")
"""

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

from dist_train import config, data, models

p = argparse.ArgumentParser()
p.add_argument("config")
p.add_argument("--mode", default="fused", choices=["fused", "per_tensor", "nosync", "barrier", "bare"])
p.add_argument("--steps", type=int, default=100)
p.add_argument("--warmup", type=int, default=5)
a = p.parse_args()

comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()
torch.set_num_threads(1)
cfg = config.load(a.config)
ds = data.load(cfg)
torch.manual_seed(cfg.seed)
model = models.build(cfg, ds.sample_shape, ds.classes)
params = list(model.parameters())

loop_s = []
if a.mode == "bare":
    buf = torch.zeros(sum(q.numel() for q in params))
    for _ in range(a.warmup + 20):
        comm.Barrier()
        t = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, buf)
        loop_s.append(time.perf_counter() - t)

opt = torch.optim.SGD(params, lr=cfg.train.lr, momentum=cfg.train.momentum)
local = cfg.train.batch_size // world
shard = np.arange(rank * len(ds) // world, (rank + 1) * len(ds) // world)
rng = np.random.default_rng([cfg.seed, rank])
order, pos = rng.permutation(shard), 0
comm.Barrier()
allreduce_s = []
for step in range(a.steps + a.warmup):
    if step == a.warmup:
        t0 = time.perf_counter()
    if pos + local > len(order):
        order, pos = rng.permutation(shard), 0
    idx = order[pos:pos + local]
    pos += local
    opt.zero_grad()
    F.cross_entropy(model(torch.from_numpy(ds.x[idx])), torch.from_numpy(ds.y[idx])).backward()
    if a.mode in ("fused", "bare"):
        flat = torch.cat([q.grad.reshape(-1) for q in params])
        if a.mode == "bare":
            comm.Barrier()
            t = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, flat)
            allreduce_s.append(time.perf_counter() - t)
        else:
            comm.Allreduce(MPI.IN_PLACE, flat)
        flat /= world
        off = 0
        for q in params:
            q.grad.copy_(flat[off:off + q.numel()].view_as(q))
            off += q.numel()
    elif a.mode == "barrier":
        comm.Barrier()
    elif a.mode == "per_tensor":
        for q in params:
            comm.Allreduce(MPI.IN_PLACE, q.grad)
            q.grad /= world
    opt.step()
elapsed = time.perf_counter() - t0
rates = comm.gather(a.steps * local / elapsed)
rss = comm.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # MB (Linux: KiB)
if rank == 0:
    out = {"steady_samples_per_sec": sum(rates), "peak_rss_mb": max(rss)}
    if a.mode == "bare":
        out.update(loop_ms=1000 * statistics.median(loop_s[a.warmup:]),
                   step_ms=1000 * statistics.median(allreduce_s[a.warmup:]), bytes=flat.numel() * 4)
    print(json.dumps(out))
