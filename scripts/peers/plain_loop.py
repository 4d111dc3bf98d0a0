"""Reference for scripts/bench.py: the plain single-process PyTorch loop, same model, data
and batch, all cores. dist-train's local mode should be within 5% of it.

    python scripts/peers/plain_loop.py conf/bench_mlp.yaml --steps 100
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch
import torch.nn.functional as F

from dist_train import config, data, models

p = argparse.ArgumentParser()
p.add_argument("config")
p.add_argument("--steps", type=int, default=100)
p.add_argument("--warmup", type=int, default=5)
a = p.parse_args()
cfg = config.load(a.config)
ds = data.load(cfg)
torch.manual_seed(cfg.seed)
model = models.build(cfg, ds.sample_shape, ds.classes)
opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
rng = np.random.default_rng(cfg.seed)
order, pos, b = rng.permutation(len(ds)), 0, cfg.train.batch_size
for step in range(a.steps + a.warmup):
    if step == a.warmup:
        t0 = time.perf_counter()
    if pos + b > len(order):
        order, pos = rng.permutation(len(ds)), 0
    idx = order[pos:pos + b]
    pos += b
    opt.zero_grad()
    F.cross_entropy(model(torch.from_numpy(ds.x[idx])), torch.from_numpy(ds.y[idx])).backward()
    opt.step()
print(json.dumps({"steady_samples_per_sec": a.steps * b / (time.perf_counter() - t0),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
