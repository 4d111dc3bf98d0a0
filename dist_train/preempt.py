"""A stop asked from outside the job, taken at a step boundary with a checkpoint.

What asks: SIGTERM, SIGINT or SIGUSR1 to a worker (what SLURM's `--signal`, Kubernetes,
a spot reclaim, torchrun and Ctrl-C send), or the run's stop file, OUT/.stop, holding a
signal's name: the `dist-train mpi|spark` wrappers and the Spark driver write it for
workers they cannot signal (Open MPI's mpirun kills its ranks at once on SIGTERM; Spark
tasks run in Python workers of the executors).

A request only records the signal. The step loop puts it into the next step's fused
tail (gradsync), so every worker learns it at the same step; rank 0 checkpoints that
step and every process leaves with `errors.Preempted`: exit 128 + the signal (143 for SIGTERM,
130 for SIGINT, 138 for SIGUSR1), the same code under every launcher (failures.py).
A second signal to the same process ends it at once (KeyboardInterrupt).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

from .files import atomic_write

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
STOP_FILE = ".stop"
POLL_S = 0.25  # how often the stop file is looked for (a stat; the step itself only reads the clock)


class _Request:
    def __init__(self):
        self.signum = 0  # the first signal caught in this process, 0: none
        self.stop_file: Path | None = None  # looked for every POLL_S
        self.next_poll = 0.0


REQUEST = _Request()


def asked() -> int:
    """The signal a stop was asked with (by a signal to this process, or the stop file), 0 if none."""
    if REQUEST.signum or REQUEST.stop_file is None:
        return REQUEST.signum
    now = time.monotonic()
    if now >= REQUEST.next_poll:
        REQUEST.next_poll = now + POLL_S
        REQUEST.signum = read(REQUEST.stop_file)
    return REQUEST.signum


def read(path: Path) -> int:
    """The signal in a stop file, 0 if there is none (or it is being written)."""
    try:
        name = path.read_text().strip()
    except OSError:  # none (atomic_write: never a half-written one)
        return 0
    found = getattr(signal, name, None)
    return int(found) if isinstance(found, signal.Signals) else int(signal.SIGTERM)


def ask(out: str | Path, signum: int) -> None:
    """Ask the workers of the run in `out` to checkpoint and stop: its stop file, written
    whole, so a reader sees it complete or not at all."""
    with contextlib.suppress(OSError):  # an --out that went away: there is nothing left to stop
        atomic_write(Path(out) / STOP_FILE, signal.Signals(signum).name.encode())


def clear(out: str | Path) -> None:
    """Remove an earlier run's stop file before a (resumed) run starts."""
    with contextlib.suppress(OSError):
        (Path(out) / STOP_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def catching(stop_file: str | Path | None = None):
    """While training: SIGNALS record a stop request (a second one raises KeyboardInterrupt),
    and `stop_file`, if given, is looked for. The previous handlers come back afterwards.
    Signal handlers can only be set in the main thread: elsewhere (a notebook's thread)
    only the stop file asks."""
    REQUEST.__init__()
    REQUEST.stop_file = Path(stop_file) if stop_file is not None else None
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            with contextlib.suppress(OSError, ValueError):
                previous[s] = signal.signal(s, _caught)
    try:
        yield REQUEST
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        REQUEST.__init__()


def _caught(signum, frame):
    if REQUEST.signum:  # asked twice: now
        raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
    REQUEST.signum = signum
    if os.isatty(2):  # Ctrl-C at a terminal: say it was heard (a step may take a while); not in a log
        with contextlib.suppress(OSError):
            os.write(2, f"[dist-train] {signal.Signals(signum).name}: stopping after this step with a checkpoint "
                        f"(again to stop at once)\n".encode())
