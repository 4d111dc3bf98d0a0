"""The kinds of failure, as exceptions. What each one costs (exit code, message, whether
every worker is aborted) is decided in one place: failures.py.

- `UserError`: bad input the user can fix (config, data file, model path, checkpoint,
  an --out in use); its message is one line.
- `TrainingError`: training cannot go on (non-finite loss, parameters drifted apart);
  every worker raises it at the same step, so no one is left waiting.
- `Preempted`: a stop was asked (a signal, the stop file); every worker stops at the
  same step, after rank 0 checkpointed it.
- `PeerFailure`: another worker died, stalled or left; this worker's failure is a
  consequence of it, and the message names that other worker.
"""

import signal


class UserError(Exception):
    """Bad input that the user can fix; its message is one line.

    `collective`: every worker raises it at the same point (a check all of them made
    together), so no worker needs to be aborted."""

    collective = False


class ConfigError(UserError):
    """A config key with a wrong name, type or value."""

    def __init__(self, key: str, problem: str):
        self.key = key
        super().__init__(f"config error: {key}: {problem}" if key else f"config error: {problem}")


class DataError(UserError):
    """A data file that is missing, unreadable or does not fit the model."""

    def __init__(self, problem: str):
        super().__init__(f"data error: {problem}")


class StartMismatch(UserError):
    """Workers started with different configs, data or checkpoints (found by all of them
    together, before any buffer is sized)."""

    collective = True


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, workers out of step); every worker raises it
    at the same step, so no one is left waiting."""

    collective = True


class Preempted(Exception):
    """Training stopped at a step boundary because a stop was asked (preempt.py); rank 0
    checkpointed that step. Every worker raises it at the same step; it exits 128 + the
    signal."""

    collective = True

    def __init__(self, signum: int, step: int, where: str, rank: int | None = None):
        self.signum, self.step = signum, step
        asked = f" (asked of rank {rank})" if rank is not None else ""
        super().__init__(f"stopped by {signal.Signals(signum).name}{asked} at step {step}: {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class PeerFailure(RuntimeError):
    """Another worker died, stalled or left: this worker fails because of it."""


def first_line(e: BaseException, limit: int = 500) -> str:
    """The first non-empty line of an exception's message, or its type's name."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(e).__name__
