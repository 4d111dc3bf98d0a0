"""Peer for scripts/bench.py: the same model, data and global batch trained the standard
way with PyTorch DDP (gloo), started by torchrun. Prints one JSON line on rank 0.

    torchrun --nproc_per_node 2 scripts/peers/ddp_train.py conf/bench_mlp.yaml --steps 100
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_train import config, data, models

p = argparse.ArgumentParser()
p.add_argument("config")
p.add_argument("--steps", type=int, default=100)
p.add_argument("--warmup", type=int, default=5)
p.add_argument("--threads", type=int, default=1)
args = p.parse_args()

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(args.threads)
cfg = config.load(args.config)
ds = data.load(cfg)
torch.manual_seed(cfg.seed)
model = DDP(models.build(cfg, ds.sample_shape, ds.classes))
opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
local_batch = cfg.train.batch_size // world
shard = np.arange(rank * len(ds) // world, (rank + 1) * len(ds) // world)
rng = np.random.default_rng([cfg.seed, rank])
order, pos, t0 = rng.permutation(shard), 0, None
for step in range(args.steps + args.warmup):
    if step == args.warmup:
        t0 = time.perf_counter()
    if pos + local_batch > len(order):
        order, pos = rng.permutation(shard), 0
    idx = order[pos:pos + local_batch]
    pos += local_batch
    x, y = torch.from_numpy(ds.x[idx]), torch.from_numpy(ds.y[idx])
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
elapsed = time.perf_counter() - t0
if rank == 0:
    print(json.dumps({"steady_samples_per_sec": args.steps * local_batch * world / elapsed}))
dist.destroy_process_group()
