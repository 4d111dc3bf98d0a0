"""Evaluation: loss and accuracy over the held-out rows, each scored once."""

from __future__ import annotations

import torch

from ..data import sharding
from . import losses


def evaluate(cfg, comm, model, data, device, batch_size: int = 1024) -> dict:
    """Loss and accuracy over the held-out rows, each scored once by the worker that holds it;
    every worker returns the same numbers."""
    rows = sharding.eval_rows(data.n, cfg.seed, cfg.data.eval_fraction, comm.rank, comm.world_size)
    totals = torch.zeros(3, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            xb, yb = data.batch(rows[i:i + batch_size], device)
            out = model(xb)
            totals[0] += len(xb)
            totals[1] += float(losses.loss_sum(cfg.train.loss, out, yb))
            totals[2] += float(losses.correct(cfg.train.loss, out, yb))
    model.train()
    comm.allreduce(totals)  # dist: sum over workers
    count, loss, right = totals.tolist()
    result = {"split": "held_out" if cfg.data.eval_fraction > 0 else "train", "samples": int(count),
              "loss": loss / count if count else None}
    if cfg.train.loss != "mse":
        result["accuracy"] = right / count if count else None
    return result
