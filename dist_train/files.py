"""Files written whole or not at all, and the lock that makes one run own its --out.

Every output goes through `atomic`: written to a temporary name in the same directory,
flushed and synced to disk, then renamed over the target, so a killed job leaves either
the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
from pathlib import Path
from typing import Callable

from .errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic(path: str | Path):
    """A binary file to write `path` through: renamed over it once written and synced,
    removed on failure. Its mode follows the umask (mkstemp's own is 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes) -> None:
    with atomic(path) as f:
        f.write(data)


ATTEMPT_NAME = ".attempt"  # the attempt of a restarted job that owns --out (dist-train mpi, Spark)
ATTEMPT_ENV = "DIST_TRAIN_ATTEMPT"  # which attempt a worker of a restarted MPI job belongs to


def claim_attempt(out: str | Path, attempt: int) -> None:
    """Make `attempt` the one that owns `out`: an older attempt's rank 0 no longer writes there."""
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(out) / ATTEMPT_NAME, str(attempt).encode())


def attempt_fence(out: str | Path | None, attempt) -> Callable[[], bool] | None:
    """For RunWriter: whether attempt `attempt` still owns `out` (None: no attempts to tell apart)."""
    if out is None or attempt is None:
        return None
    marker, mine = Path(out) / ATTEMPT_NAME, str(attempt)
    return lambda: marker.exists() and marker.read_text().strip() == mine


LOCK_NAME = ".lock"


class OutLock:
    """An exclusive flock on OUT/.lock, held by the process that writes a run's outputs
    for as long as the run lasts. The kernel drops it when that process ends, however it
    ends, so a killed run never leaves --out locked."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self._fd: int | None = None

    def acquire(self) -> "OutLock":
        """Take the lock, or raise UserError naming who holds it."""
        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"--out {self.out} is in use by another run ({holder}); wait for it to end "
                            f"or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def check_unlocked(out: str | Path) -> None:
    """Fail now, with the holder named, if a run holds `out` (a check, not a hold: the
    process that writes the run takes the lock itself)."""
    if (Path(out) / LOCK_NAME).exists():
        OutLock(out).acquire().release()


def alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by its parent, counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
