"""Where the time goes: this worker's seconds by kind, all workers' (summed through the
step's own collective), and the steady-state speed."""

from __future__ import annotations

import os
import time

from ..jobenv import STARTED_ENV
from .gradsync import TIMES

STEADY_SKIP = 5  # steps left out of the steady-state speed (warm-up, allocator growth)


class Clock:
    def __init__(self, world_size: int, samples_at_start: int):
        self.world = world_size
        self.mine = dict.fromkeys(TIMES, 0.0)  # this worker's seconds, by kind
        self.all = [0.0] * len(TIMES)  # all workers' seconds, summed (each worker's last step is not in it)
        self._interval, self._interval_steps = [0.0] * len(TIMES), 0  # all workers' since the last logged line
        self.start = time.perf_counter()
        self.samples_at_start = samples_at_start
        self.last_log = (self.start, samples_at_start)
        self.steps_run = 0  # in this process (a resumed run starts from 0 here)
        self._steady = None  # (time, samples) once STEADY_SKIP steps ran
        self.epoch_start = self.start
        self.end = None

    def step_done(self, mine: tuple, summed: tuple, samples: int) -> float:
        """Count a step: this worker's seconds (TIMES) and all workers' of the step before
        (they travel with this step's gradients)."""
        now = time.perf_counter()
        for i, kind in enumerate(TIMES):
            self.mine[kind] += mine[i]
            self._interval[i] += summed[i]
            self.all[i] += summed[i]
        self._interval_steps += 1 if self.steps_run else 0  # the first step carries no previous step's times
        self.steps_run += 1
        if self.steps_run == STEADY_SKIP:
            self._steady = (now, samples)
        return now

    def interval_means(self) -> list[float]:
        """Mean seconds per step and worker since the last call (TIMES)."""
        means = [v / max(self._interval_steps * self.world, 1) for v in self._interval]
        self._interval, self._interval_steps = [0.0] * len(TIMES), 0
        return means

    def rate_since_log(self, samples: int) -> tuple[float, float]:
        """Samples per second since the last logged line; now."""
        now = time.perf_counter()
        rate = (samples - self.last_log[1]) / max(now - self.last_log[0], 1e-9)
        self.last_log = (now, samples)
        return rate, now

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` spent between steps (a held-out evaluation) out of every speed."""
        self.last_log = (self.last_log[0] + seconds, self.last_log[1])
        if self._steady is not None:
            self._steady = (self._steady[0] + seconds, self._steady[1])
        self.epoch_start += seconds

    def stop(self) -> float:
        self.end = time.perf_counter()
        return self.end - self.start

    def steady_rate(self, samples: int) -> float | None:
        if self._steady is None or self.end is None or self.end <= self._steady[0]:
            return None
        return (samples - self._steady[1]) / (self.end - self._steady[0])


def job_start(default: float | None = None) -> float:
    """When the job started, in epoch seconds: what the dist-train wrapper recorded (mpirun
    and spark-submit take seconds to reach training), else `default`, else when this
    process started (a launcher's: its imports count)."""
    try:
        return float(os.environ[STARTED_ENV])
    except (KeyError, ValueError):
        if default is not None:
            return default
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])  # starttime, since boot
        uptime = float(open("/proc/uptime").read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()
