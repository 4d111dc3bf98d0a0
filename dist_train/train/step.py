"""One optimizer step: micro-batches, the exchange, the non-finite policy.

    local batch(es) -> forward -> loss summed, times 1 / (the step's global count)
    -> backward (gradients add up in the fused buffer) -> one allreduce: the mean
    -> optimizer step, or every worker skips or stops together on a non-finite loss
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from .. import failures
from ..errors import TrainingError
from . import losses
from .gradsync import TIMES, StepStats


class Step:
    def __init__(self, cfg, comm, model, optimizer, grads, data, device, log):
        self.t, self.comm, self.model, self.optimizer, self.grads = cfg.train, comm, model, optimizer, grads
        self.data, self.device, self.log = data, device, log
        self.bf16 = cfg.train.precision == "bf16"
        self.last_times = (0.0,) * len(TIMES)  # this worker's previous step, sent along with the next one's gradients
        self.since = None  # when this worker left the previous exchange: arrivals are counted from there
        self.skipped = 0  # steps skipped for a non-finite loss
        self._scale = (None, None)  # (1 / the step's global count, as the tensor backward starts from)

    def __call__(self, number: int, micro: list[np.ndarray], count: int, lr: float, logged: bool) -> StepStats:
        """Run optimizer step `number` (1-based) on this worker's `micro`-batches, `count`
        samples in the global batch; `logged`: count correct predictions too."""
        t0 = time.perf_counter()
        since = self.since if self.since is not None else t0
        failures.PROGRESS.step = number
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.grads.zero()
        samples, loss_sum, right, t_data = self._forward_backward(micro, 1.0 / count, logged)
        t2 = time.perf_counter()
        # dist: a worker whose shard is used up still joins the step, with zeros
        stats = self.grads.sync(self.comm, samples, loss_sum, right, self.last_times, arrived=t2 - since)
        t3 = self.since = time.perf_counter()
        if stats.count != count and count < self.grads.exact_counts:  # the same plan everywhere: other data?
            raise TrainingError(f"step {number}: the workers' batches hold {stats.count} samples, the plan says "
                                f"{count}: do all workers read the same data?")
        self._apply(number, stats)
        t4 = time.perf_counter()
        waited = min(stats.waited, t3 - t2)
        self.last_times = (t_data, (t2 - t0 - t_data) + (t4 - t3), t3 - t2 - waited, waited)
        return stats

    def _forward_backward(self, micro, scale: float, logged: bool):
        t, model = self.t, self.model
        if self._scale[0] != scale:  # the count changes at an epoch's last step only: one tensor per count
            self._scale = (scale, torch.full((), scale, device=self.device))
        samples, loss_sum, right, t_data = 0, 0.0, 0, 0.0
        for i, rows in enumerate(micro):  # micro-batches: gradients add up in place
            ta = time.perf_counter()
            xb, yb = self.data.batch(rows, self.device)
            t_data += time.perf_counter() - ta
            # (a disabled autocast still costs ~3 us to enter and leave, a nullcontext 0.3)
            with torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext():
                out = model(xb)
            loss = losses.loss_sum(t.loss, out.float(), yb)
            # dist: backward from 1 / the global count (not 1), so the summed gradients are the mean;
            # the same floats as (loss * scale).backward(), without a node for the product
            loss.backward(self._scale[1])
            samples += len(rows)
            loss_sum = loss_sum + loss.detach() if i else loss.detach()  # one micro-batch: no tensor op
            if logged:
                right = right + losses.correct(t.loss, out.detach(), yb)
        return samples, loss_sum, right, t_data

    def _apply(self, number: int, stats: StepStats) -> None:
        """The optimizer step, or, on a non-finite loss on any worker, the same on every
        worker (they all see the same flags): skip it, or stop naming the step and ranks."""
        if not stats.nonfinite_ranks:
            self.optimizer.step()
            return
        where = ", ".join(map(str, stats.nonfinite_ranks))
        if not self.t.skip_nonfinite:
            raise TrainingError(f"non-finite loss at step {number} on rank(s) {where} "
                                f"(set train.skip_nonfinite: true to skip such steps)")
        self.log(f"[dist-train] step {number}: non-finite loss on rank(s) {where}; step skipped")
        self.skipped += 1
