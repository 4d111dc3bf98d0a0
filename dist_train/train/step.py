"""One optimizer step: micro-batches, the exchange, the non-finite policy.

    local batch(es) -> forward -> loss summed, times 1 / (the step's global count)
    -> backward (gradients add up in the fused buffer) -> one allreduce: the mean
    -> optimizer step, or every worker skips or stops together on a non-finite loss

fp16 starts backward from (loss scale / count) and unscales the summed gradients, which
every worker holds alike: an overflow skips the same step everywhere (scaler.py).
"""

from __future__ import annotations

import contextlib
import itertools
import time

import torch

from .. import failures, models, preempt
from ..errors import TrainingError
from .gradsync import TIMES, StepStats
from .optim import step_function

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_ENGINE_BACKWARD = getattr(torch.autograd.graph, "_engine_run_backward", None)


def backward_from(loss: torch.Tensor, grad: torch.Tensor) -> None:
    """loss.backward(grad), for a plain tensor straight into autograd's engine, as
    torch.autograd.backward calls it once it has checked its arguments: that check imports
    torch.fx's symbolic shapes and sympy on the first call (~0.5 s of every worker's
    start-up here) to compare two shapes, equal here by construction (0-d). Anything else
    (a tensor subclass, a shape mismatch, a loss without a graph) takes torch's own path
    and its messages."""
    if (_ENGINE_BACKWARD is None or type(loss) is not torch.Tensor or loss.grad_fn is None
            or loss.shape != grad.shape or loss.dtype != grad.dtype or loss.device != grad.device):
        loss.backward(grad)
        return
    _ENGINE_BACKWARD((loss,), (grad,), False, False, (), allow_unreachable=True, accumulate_grad=True)


class Step:
    def __init__(self, cfg, comm, model, optimizer, grads, loss, metrics, device, log, scaler=None):
        self.t, self.comm, self.model, self.optimizer, self.grads = cfg.train, comm, model, optimizer, grads
        self.loss, self.metrics, self.device, self.log = loss, metrics, device, log
        self.autocast = AUTOCAST[cfg.train.precision]  # None: fp32
        self.scaler = scaler  # fp16's LossScale
        self.optimizer_step = step_function(optimizer)
        self.last_times = (0.0,) * len(TIMES)  # this worker's previous step, sent along with the next one's gradients
        self.since = None  # when this worker left the previous exchange: arrivals are counted from there
        self.ended = None  # when the previous step returned: the loop's time between steps is counted from there
        self.skipped = 0  # steps skipped for a non-finite loss
        self._scale = (None, None)  # (1 / the step's global count, as the tensor backward starts from)

    def __call__(self, number: int, micro, count: int, lr: float, logged: bool) -> StepStats:
        """Run optimizer step `number` (1-based) on this worker's `micro`-batches (an
        iterator of (samples, inputs, targets)), `count` samples in the global batch;
        `logged`: compute the metrics too."""
        t0 = time.perf_counter()
        since = self.since if self.since is not None else t0
        between = t0 - self.ended if self.ended is not None else 0.0
        failures.PROGRESS.step = number
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.grads.zero()
        start = (self.scaler.scale if self.scaler is not None else 1.0) / count
        samples, loss_sum, measured, t_data = self._forward_backward(micro, start, logged)
        t2 = time.perf_counter()
        # dist: a worker whose shard is used up still joins the step, with zeros
        stats = self.grads.sync(self.comm, samples, loss_sum, measured, self.last_times, arrived=t2 - since,
                                stop=preempt.asked())  # dist: a stop asked of any worker reaches all at this step
        t3 = self.since = time.perf_counter()
        if stats.count != count and count < self.grads.exact_counts:  # the same plan everywhere: other data?
            raise TrainingError(f"step {number}: the workers' batches hold {stats.count} samples, the plan says "
                                f"{count}: do all workers read the same data?")
        self._apply(number, stats)
        t4 = self.ended = time.perf_counter()
        waited = min(stats.waited, t3 - t2)
        self.last_times = (t_data, t2 - t0 - t_data, t4 - t3, t3 - t2 - waited, waited, between)  # TIMES
        return stats

    def pause(self, seconds: float) -> None:
        """Leave `seconds` spent between two steps (a held-out evaluation) out of `other`."""
        if self.ended is not None:
            self.ended += seconds

    def _forward_backward(self, micro, scale: float, logged: bool):
        model = self.model
        if self._scale[0] != scale:  # the count changes at an epoch's last step only (and fp16's loss scale)
            self._scale = (scale, torch.full((), scale, device=self.device))
        samples, loss_sum, measured, t_data = 0, 0.0, [0.0] * (2 * len(self.metrics)) if logged else [], 0.0
        micro = iter(micro)
        for i in itertools.count():  # micro-batches: gradients add up in place
            ta = time.perf_counter()
            got = next(micro, None)
            t_data += time.perf_counter() - ta
            if got is None:
                break
            n, xb, yb = got
            # (a disabled autocast still costs ~3 us to enter and leave, a nullcontext 0.3)
            with torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext():
                out = models.apply(model, xb)
            if self.autocast and isinstance(out, torch.Tensor):
                out = out.float()  # the loss in fp32
            loss = self.loss.sum(out, yb)
            # dist: backward from 1 / the global count (not 1), so the summed gradients are the mean
            # (fp16: times the loss scale, a power of two);
            # the same floats as (loss * scale).backward(), without a node for the product
            backward_from(loss, self._scale[1])
            samples += n
            loss_sum = loss_sum + loss.detach() if i else loss.detach()  # one micro-batch: no tensor op
            if logged:
                out = out.detach() if isinstance(out, torch.Tensor) else out
                for j, metric in enumerate(self.metrics):
                    total, counted = metric(out, yb)
                    measured[2 * j] += total
                    measured[2 * j + 1] += counted
        return samples, loss_sum, measured, t_data

    def _apply(self, number: int, stats: StepStats) -> None:
        """The optimizer step, or, on a non-finite loss on any worker, the same on every
        worker (they all see the same flags): skip it, or stop naming the step and ranks.
        fp16: gradients that overflowed at the loss scale skip the step, everywhere alike."""
        if not stats.nonfinite_ranks:
            if self.scaler is None:
                self.optimizer_step()
                return
            scale = self.scaler.scale
            overflow = self.scaler.unscale(self.grads.grad_tensors())  # the summed gradients: alike everywhere
            self.scaler.update(overflow)
            if not overflow:
                self.optimizer_step()
            else:
                self.log(f"[dist-train] step {number}: fp16 gradients overflowed at loss scale {scale:g}; "
                         f"step skipped, scale now {self.scaler.scale:g}")
            return
        where = ", ".join(map(str, stats.nonfinite_ranks))
        if not self.t.skip_nonfinite:
            raise TrainingError(f"non-finite loss at step {number} on rank(s) {where} "
                                f"(set train.skip_nonfinite: true to skip such steps)")
        self.log(f"[dist-train] step {number}: non-finite loss on rank(s) {where}; step skipped")
        self.skipped += 1
