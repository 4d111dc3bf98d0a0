"""Evaluation: the loss and the metrics over the held-out rows, each scored once."""

from __future__ import annotations

import torch

from .. import models
from ..data import sharding


def evaluate(cfg, comm, model, data, device, loss, metrics, batch_size: int = 1024) -> dict:
    """Loss and metrics over the held-out rows, each scored once by the worker that holds it;
    every worker returns the same numbers."""
    rows = sharding.eval_rows(data.n, cfg.seed, cfg.data.eval_fraction, comm.rank, comm.world_size)
    totals = torch.zeros(2 + 2 * len(metrics), dtype=torch.float64)
    model.eval()
    chunks = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    with torch.no_grad():
        for n, xb, yb in data.feed(-1, chunks, device, training=False):
            out = models.apply(model, xb)
            totals[0] += n
            totals[1] += float(loss.sum(out, yb))
            for j, metric in enumerate(metrics):
                total, count = metric(out, yb)
                totals[2 + 2 * j] += total
                totals[3 + 2 * j] += count
    model.train()
    comm.allreduce(totals)  # dist: sum over workers
    count, summed = totals[0].item(), totals[1].item()
    result = {"split": "held_out" if cfg.data.eval_fraction > 0 else "train", "samples": int(count),
              "loss": summed / count if count else None}
    for j, metric in enumerate(metrics):
        total, counted = totals[2 + 2 * j].item(), totals[3 + 2 * j].item()
        result[metric.name] = total / counted if counted else None
    return result
