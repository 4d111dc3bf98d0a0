"""Learning rate as a pure function of the step: warmup, then constant, cosine or step decay,
optionally scaled with the effective global batch (batch_size x accumulate) relative to base_batch."""

from __future__ import annotations

import math


def lr_at(t, step: int, total_steps: int) -> float:
    """The lr for optimizer step `step` (0-based) of `total_steps`; `t` is cfg.train."""
    lr = t.lr
    batch = t.batch_size * t.accumulate
    if t.lr_scaling == "linear":
        lr *= batch / t.base_batch
    elif t.lr_scaling == "sqrt":
        lr *= math.sqrt(batch / t.base_batch)
    if t.warmup_steps and step < t.warmup_steps:
        return lr * (step + 1) / t.warmup_steps
    after = step - t.warmup_steps
    if t.schedule == "cosine":
        span = max(total_steps - t.warmup_steps, 1)
        return lr * 0.5 * (1 + math.cos(math.pi * min(after, span) / span))
    if t.schedule == "step":
        return lr * t.decay_factor ** (after // t.decay_every)
    return lr
