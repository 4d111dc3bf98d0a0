"""The failure policy, in one place: each kind of failure has one exit code, one line of
message and one rule for whether every other worker must be aborted. A launcher
supplies only how to abort its world (MPI_Abort, leaving a torch.distributed group,
leaving the process); the same failure exits with the same code under every launcher.

| kind | raised as | exit | others aborted | the line (on stderr) |
|---|---|---|---|---|
| bad input, found by every worker alike | UserError (collective) | 2 | no | `error: <what is wrong>` |
| bad input, found by one worker | UserError | 2 | yes | `error: [rank R] <what is wrong>` |
| training stopped on purpose | TrainingError | 3 | no | `error: non-finite loss at step S on rank(s) R ...` |
| a worker raised | any other exception | 1 | yes | traceback, then `error: rank R failed with T: ...` |
| a peer failed first | PeerFailure | 1 | yes | `error: <the peer and what happened to it>; aborting ...` |
| a worker left early | SystemExit in training, or its process gone | 1 | yes | `error: rank R exited at step S; aborting ...` |
| a worker stalled or froze | the watchdog | 1 | yes | `error: rank(s) R stalled: ...` |
| stopped by a signal (preempt.py) | Preempted (collective) | 128 + signal | no | `[dist-train] stopped by SIGTERM at step S: checkpoint ...` |
| interrupted (a second signal) | KeyboardInterrupt | 130 | yes | `error: interrupted at step S` |

"Collective" failures are raised by every worker at the same point, so each leaves on its
own and only one of them (rank 0, or the one that knows most) says the line.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable

from .errors import PeerFailure, Preempted, TrainingError, UserError, first_line


@dataclass(frozen=True)
class Kind:
    name: str
    exit_code: int
    abort: bool  # the other workers may be waiting on this one: end them all


BAD_INPUT = Kind("bad input", 2, abort=True)
BAD_INPUT_EVERYWHERE = Kind("bad input, every worker", 2, abort=False)
STOPPED = Kind("training stopped", 3, abort=False)
RAISED = Kind("a worker raised", 1, abort=True)
PEER = Kind("a peer failed", 1, abort=True)
EXITED = Kind("a worker exited", 1, abort=True)
STALLED = Kind("a worker stalled", 1, abort=True)
INTERRUPTED = Kind("interrupted", 130, abort=True)
PREEMPTED = Kind("stopped by a signal", 128 + 15, abort=False)  # 128 + the signal: Preempted.exit_code


class Progress:
    """Where this worker is, for the lines above and the watchdog: the step it is on and
    the collectives it entered. One worker per process, so one record per process."""

    def __init__(self):
        self.step = 0  # the optimizer step being run (1-based), 0 before training
        self.training = False  # inside fit's loop: leaving now is a failure
        self.started = False  # the job's own code runs (config, data, model): a sys.exit now is no request
        self.finished = False  # past fit's last collective: a peer leaving now is no failure
        self.collectives = 0  # entered so far (comm.watchdog counts them)


PROGRESS = Progress()
_LEAVING: list[Callable[[], None]] = []  # told before this worker aborts (the watchdog tells its peers)
DIAGNOSIS: list[str] = []  # what a watchdog found and said, where the transport then fails by itself
_TIMERS: list[threading.Timer] = []  # deferred exits, cancelled when the worker's part ends first


def on_abort(hook: Callable[[], None]) -> None:
    _LEAVING.append(hook)


def off_abort(hook: Callable[[], None]) -> None:
    if hook in _LEAVING:
        _LEAVING.remove(hook)


def reset() -> None:
    """A new worker in this process (a Spark Python worker runs task after task)."""
    PROGRESS.__init__()
    DIAGNOSIS.clear()
    while _TIMERS:
        _TIMERS.pop().cancel()


def kind_of(e: BaseException) -> Kind:
    if isinstance(e, UserError):
        return BAD_INPUT_EVERYWHERE if e.collective else BAD_INPUT
    if isinstance(e, TrainingError):
        return STOPPED
    if isinstance(e, Preempted):
        return PREEMPTED
    if isinstance(e, PeerFailure):
        return PEER
    if isinstance(e, SystemExit):
        return EXITED
    if isinstance(e, KeyboardInterrupt):
        return INTERRUPTED
    return RAISED


_KINDS_BY_NAME = {"UserError": BAD_INPUT, "ConfigError": BAD_INPUT, "DataError": BAD_INPUT,
                  "StartMismatch": BAD_INPUT_EVERYWHERE, "TrainingError": STOPPED, "PeerFailure": PEER,
                  "SystemExit": EXITED, "KeyboardInterrupt": INTERRUPTED}


def exit_code_of(type_name: str, message: str = "") -> int:
    """The exit code of a failure known only by its exception's name and message (a Spark
    task's error reaches the driver as text)."""
    if type_name == "Preempted":
        found = re.search(r"stopped by (SIG[A-Z0-9]+)", message)
        return 128 + int(getattr(signal, found.group(1), signal.SIGTERM) if found else signal.SIGTERM)
    return _KINDS_BY_NAME.get(type_name, RAISED).exit_code


def lines_for(e: BaseException, rank: int, world: int) -> list[str]:
    """What this worker says of `e` (empty where another worker says it)."""
    kind = kind_of(e)
    step = PROGRESS.step
    if not kind.abort:
        said = f"[dist-train] {e}" if kind is PREEMPTED else f"error: {e}"
        return [said] if rank == getattr(e, "speaker", 0) else []
    everyone = f"; aborting all {world} ranks" if world > 1 else ""
    if kind is BAD_INPUT:
        return [f"error: [rank {rank}] {e}" if world > 1 else f"error: {e}"]
    if kind is PEER:
        return [f"error: {e}{everyone}"]
    if kind is EXITED:
        return [f"error: rank {rank} exited at step {step}{everyone}"]
    if kind is INTERRUPTED:
        return [f"error: interrupted at step {step}" + (f" (rank {rank}){everyone}" if world > 1 else "")]
    prefix = f"[rank {rank}] " if world > 1 else ""
    detail = "".join(traceback.format_exception(e)).rstrip().replace("\n", f"\n{prefix}")
    who = f"rank {rank} failed with " if world > 1 else ""
    return [f"{prefix}{detail}", f"{prefix}error: {who}{type(e).__name__}: {first_line(e)}{everyone}"]


def say(*lines: str) -> None:
    """Lines on stderr, after what stdout holds (never raising: a lost terminal must not
    stop a worker from leaving)."""
    try:
        sys.stdout.flush()
        for line in lines:
            print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def handle(e: BaseException, *, rank: int, world: int, abort: Callable[[int], None]) -> int:
    """Say what `e` means, abort the other workers where they may wait on this one, and
    return the exit code (abort may not return)."""
    if isinstance(e, SystemExit) and not PROGRESS.training:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not PROGRESS.started:  # leaving before the job began (--help): as asked
            return code
        say(f"error: {'rank ' + str(rank) + ' ' if world > 1 else ''}exited (sys.exit({e.code!r})) before training "
            f"began: the model, dataset or loss code called it; nothing was trained")
        if world > 1:
            abort_world(abort, EXITED.exit_code)
        return code or EXITED.exit_code
    if DIAGNOSIS and kind_of(e).abort:  # the watchdog said the cause: this failure is its consequence
        kind = PEER
    else:
        kind = kind_of(e)
        say(*lines_for(e, rank, world))
    if kind.abort and world > 1:
        abort_world(abort, kind.exit_code)
    return e.exit_code if isinstance(e, Preempted) else kind.exit_code


def abort_world(abort: Callable[[int], None], code: int) -> None:
    """Tell the watchdog's peers that this worker aborts (so none reports it as gone), then abort."""
    for hook in _LEAVING:
        try:
            hook()
        except Exception:  # noqa: BLE001 - aborting anyway
            pass
    say()  # what stdout holds goes out first
    abort(code)


@contextlib.contextmanager
def leaving(comm):
    """Close `comm` (its watchdog tells the peers this worker is done) when the worker's
    part ends cleanly or with a failure every worker shares; leave it open when this worker
    is about to abort the others, which its watchdog tells them instead."""
    try:
        yield comm
    except BaseException as e:
        if not kind_of(e).abort:
            comm.close()
        raise
    comm.close()


def deferred_exit(grace_s: float) -> Callable[[str], None]:
    """A watchdog's `fail` for a transport that times out by itself (torch.distributed):
    say the line and keep it (the main thread's failure, soon after, is reported as its
    consequence); leave the process if it has not failed within `grace_s`."""

    def fail(line: str) -> None:
        DIAGNOSIS.append(line.removeprefix("error: "))
        say(line)
        timer = threading.Timer(grace_s, os._exit, args=(1,))
        timer.daemon = True
        timer.start()
        _TIMERS.append(timer)

    return fail


def run(main: Callable[[], object], *, rank: Callable[[], int], world: Callable[[], int],
        abort: Callable[[int], None]) -> int:
    """Run a worker's `main` under the policy: 0, or SystemExit with the failure's code.
    `rank` and `world` are asked only on failure (they may not be known before the world
    is joined)."""
    reset()  # a new worker's main (tests and notebooks run several in one process)
    try:
        main()
        return 0
    except BaseException as e:  # noqa: BLE001 - every failure goes through the table
        code = handle(e, rank=rank(), world=world(), abort=abort)
    if code:
        raise SystemExit(code)
    return 0


def kill_with_parent(signum: int = 9) -> None:
    """This process gets `signum` (default SIGKILL) the moment its parent dies
    (PR_SET_PDEATHSIG; Linux). For children that must never outlive their worker."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signum)
    except (OSError, AttributeError):
        pass  # not Linux: a parent's death leaves the child to its own devices


_PARENT_WATCH: list[int] = []


def exit_with_parent(name: str, interval_s: float = 0.5) -> None:
    """Leave if this process's parent goes away (mpirun killed by kill -9, a Spark executor
    lost): orphaned workers would train on. A thread polls for a new parent, as
    TorchDistributor does for its children."""
    if _PARENT_WATCH:
        return
    parent = os.getppid()
    _PARENT_WATCH.append(parent)

    def watch():
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                say(f"[{name}] its parent (pid {parent}) is gone; exiting")
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="dist-train-parent-watch").start()
