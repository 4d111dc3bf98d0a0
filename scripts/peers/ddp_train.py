"""Peer for scripts/bench.py: the same model, data and global batch trained the standard
way with PyTorch DDP (gloo). Started by torchrun, or by TorchDistributor (peers/torch_distributor.py).

    torchrun --nproc_per_node 2 scripts/peers/ddp_train.py conf/bench_mlp.yaml --steps 100

Prints one JSON line on rank 0: {"steady_samples_per_sec": ..., "peak_rss_mb": ...}.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def train(config_path: str, steps: int, warmup: int = 5, threads: int = 1) -> tuple[float, float]:
    """A plain DDP loop; returns steady-state samples/s (all ranks) and the largest peak RSS
    of any rank (MB), on every rank."""
    import resource

    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dist_train import config, data, models

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(threads)
    cfg = config.load(config_path)
    ds = data.load(cfg)
    torch.manual_seed(cfg.seed)
    model = DDP(models.build(cfg, ds.sample_shape, ds.classes))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
    local_batch = cfg.train.batch_size // world
    shard = np.arange(rank * len(ds) // world, (rank + 1) * len(ds) // world)
    rng = np.random.default_rng([cfg.seed, rank])
    order, pos, t0 = rng.permutation(shard), 0, time.perf_counter()
    for step in range(steps + warmup):
        if step == warmup:
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
    rss = torch.tensor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # MB (Linux: KiB)
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    dist.destroy_process_group()
    return steps * local_batch * world / elapsed, rss.item()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    import os

    sps, rss = train(a.config, a.steps, a.warmup, a.threads)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({"steady_samples_per_sec": sps, "peak_rss_mb": rss}))
