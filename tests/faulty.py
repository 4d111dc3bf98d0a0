"""User models (named by model.target) that fail on purpose on one rank at one step, or are slow there."""

from __future__ import annotations

import os
import re
import signal
import sys
import time

import torch
from torch import nn


def current_rank() -> int:
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        if ctx is not None:
            return ctx.partitionId()
    except ImportError:
        pass
    return 0


class Faulty(nn.Module):
    def __init__(self, inputs, outputs, fail_rank, fail_step, mode, marker=None, heartbeat=None, stamp=None):
        super().__init__()
        self.stamp = stamp  # the time of the fault is written here
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, 16), nn.ReLU(), nn.Linear(16, outputs))
        self.fail_rank, self.fail_step, self.mode, self.marker = fail_rank, fail_step, mode, marker
        self.heartbeat = heartbeat
        self.calls = 0

    def forward(self, x):
        out = self.net(x)
        if torch.is_grad_enabled():  # training steps only, not the validation probe or eval
            self.calls += 1
            if self.heartbeat:  # lets a test see whether any worker is still training
                with open(f"{self.heartbeat}.{current_rank()}", "w") as f:
                    f.write(str(self.calls))
            if self.mode == "slow" and current_rank() == self.fail_rank:  # a straggler: 50 ms more every step
                time.sleep(0.05)
            elif self.mode == "pause" and self.calls == self.fail_step and self.fail_rank in (current_rank(), -1):
                time.sleep(4.5)  # busy (fail_rank -1: every rank), then goes on
            elif self.calls == self.fail_step and current_rank() == self.fail_rank and self._armed():
                if self.mode == "nan":
                    return out * float("nan")
                if self.mode == "drift":  # this worker's weights leave the others'
                    with torch.no_grad():
                        next(self.parameters()).add_(0.5)
                self._fail()
        return out

    def _armed(self) -> bool:
        """With a marker file, fail only once (the first attempt of a retried job)."""
        if self.marker is None:
            return True
        if os.path.exists(self.marker):
            return False
        open(self.marker, "w").close()
        return True

    def _fail(self):
        if self.stamp:
            with open(self.stamp, "w") as f:
                f.write(str(time.time()))
        if self.mode == "stop":  # frozen: no thread of this process runs
            os.kill(os.getpid(), signal.SIGSTOP)
        if self.mode == "gil":  # a catastrophic regex: C code that holds the GIL for ever
            re.match(r"(a+)+$", "a" * 64 + "b")
        if self.mode == "exit":  # a clean-looking exit in the middle of training
            sys.exit(0)
        if self.mode == "os_exit":
            os._exit(0)
        if self.mode == "raise":
            raise RuntimeError(f"injected failure at step {self.fail_step}")
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.mode == "sleep":
            time.sleep(3600)


def model(inputs=64, outputs=10, fail_rank=1, fail_step=3, mode="raise", marker=None, heartbeat=None, stamp=None):
    return Faulty(inputs, outputs, fail_rank, fail_step, mode, marker, heartbeat, stamp)


def exits_when_built(inputs=64, outputs=10):
    sys.exit(0)  # a user's model that "leaves" as it is built


def not_a_module():
    return 42


class BrokenCrops:
    """examples/byo.py's dataset, whose item `fail_at` raises (a corrupt file, say)."""

    def __init__(self, fail_at: int, pad: int = 1):
        import byo  # beside the config, examples/

        self.inner, self.fail_at, self.num_classes = byo.CroppedDigits(pad), fail_at, 10

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise ValueError(f"row {i} is broken")
        return self.inner[i]
