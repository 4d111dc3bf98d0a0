"""A watchdog on every rank, independent of the transport.

The ranks form a ring of TCP connections: rank r opens one to rank r+1 and watches it;
rank r+1 sends its progress (step, collectives entered) down that connection every
BEAT_S from a thread of its own, so the training loop's path does nothing for it. The
watcher ends the job, naming the rank, when its successor

- exited: the connection closed without a "done" (any exit, os._exit or a kill: the
  kernel closes a dead process's sockets at once) -> `rank R (pid P) exited at step S`;
- froze: no heartbeat for comm.timeout_s (SIGSTOP, or a C call holding the GIL, so that
  no thread of it runs) -> `rank R stalled: no heartbeat for T s at step S`;
- stalled: behind the watcher (fewer collectives entered) and without progress for
  comm.timeout_s, while the others wait for it in a collective
  -> `rank(s) R stalled: no progress for T s at step S ...`.

Ranks that pause together (a long evaluation) are behind no one: no stall. A rank that
aborts says so to its watcher first, which passes it on around the ring, so no one
reports a consequence as the cause. How the job ends is the launcher's (`fail(line)`):
MPI_Abort under mpirun, leaving the process under torch.distributed.
"""

from __future__ import annotations

import hashlib
import os
import select
import signal
import socket
import struct
import threading
import time
from typing import Callable

import torch

from .. import failures
from ..errors import PeerFailure
from .base import Communicator

BEAT_S = 0.1
FROZEN_KILL_S = 8.0  # after naming a frozen peer on this host, SIGKILL it (after gloo's own timeout has failed us)
SETUP_S = 60.0  # the ring forms within this (or comm.timeout_s, if shorter), or the job fails at start
FRAME = struct.Struct("!iqq")  # kind, step, collectives
HELLO = struct.Struct("!8si")  # job token, rank
BEAT, DONE, ABORT = 1, 2, 3
ADDRESS_BYTES = 64


class Watched(Communicator):
    """`inner` with a watchdog: counts the collectives this worker enters (its progress)."""

    def __init__(self, inner: Communicator, timeout_s: float, fail: Callable[[str], None] | None = None,
                 address: str | None = None, slack_s: float = 0.0):
        self._inner = inner
        self.rank, self.world_size = inner.rank, inner.world_size
        self._dog = Watchdog(inner, timeout_s, fail or _leave, address, slack_s)

    def allreduce(self, buf):
        failures.PROGRESS.collectives += 1
        self._inner.allreduce(buf)

    def broadcast(self, buf, root=0):
        failures.PROGRESS.collectives += 1
        self._inner.broadcast(buf, root)

    def close(self):
        self._dog.close()
        self._inner.close()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _leave(line: str) -> None:
    failures.say(line)
    os._exit(1)


class Watchdog(threading.Thread):
    def __init__(self, comm: Communicator, timeout_s: float, fail: Callable[[str], None], address: str | None,
                 slack_s: float = 0.0):
        super().__init__(daemon=True, name="dist-train-watchdog")
        self.rank, self.world, self.timeout_s, self._fail = comm.rank, comm.world_size, timeout_s, fail
        self._limit = timeout_s + slack_s  # when it acts (later than the transport's own checks, if those speak first)
        self.peer = (self.rank + 1) % self.world
        self._send_lock, self._halt, self._failed = threading.Lock(), threading.Event(), False
        listener = socket.create_server(("", 0), backlog=16)
        try:
            table = _exchange(comm, address or own_address(), listener.getsockname()[1])
            token = hashlib.sha256(table[0].numpy().tobytes()).digest()[:8]
            deadline = time.monotonic() + min(timeout_s, SETUP_S)
            self._down = _connect(table[self.peer], deadline)  # the successor, watched through this one
            try:
                self._down.sendall(HELLO.pack(token, self.rank))
                self._up = _accept(listener, token, (self.rank - 1) % self.world, deadline)
            except BaseException:
                self._down.close()
                raise
            self._up.settimeout(1.0)  # a watcher that stopped reading (frozen) must not block this thread
        finally:
            listener.close()
        self._peer_pid = int(table[self.peer][1])
        self._peer_here = _address_of(table[self.peer])[0] == _address_of(table[self.rank])[0]  # the same host
        self._heard, self._step, self._ops, self._behind_since = time.monotonic(), 0, 0, None
        self._peer_left, self._pending = False, b""
        failures.on_abort(self.aborting)
        self.start()

    def run(self):
        try:
            self._watch()
        except Exception as e:  # noqa: BLE001 - a watchdog that breaks must not look like a frozen rank
            failures.say(f"[dist-train] rank {self.rank}: the watchdog stops watching rank {self.peer}: {e!r}")
        while not self._halt.wait(BEAT_S):  # the successor is done or aborting: keep telling ours that we live
            self._send(BEAT)

    def _watch(self) -> None:
        poller = select.poll()  # not select.select: a descriptor past 1023 would break it
        poller.register(self._down, select.POLLIN)
        next_beat, last = 0.0, time.monotonic()
        while not self._halt.is_set() and not self._peer_left:
            if poller.poll(BEAT_S * 1000):
                self._read()
            now = time.monotonic()
            if now - last > 10 * BEAT_S:  # this process was paused (SIGSTOP of the job, a suspended allocation):
                self._heard, self._behind_since = now, None  # its peers were too; give them their beats first
            last = now
            if now >= next_beat:
                self._send(BEAT)
                next_beat = now + BEAT_S
            if not self._peer_left:
                self._check(now)

    def _read(self) -> None:
        try:
            data = self._down.recv(4096)
        except OSError:
            data = b""
        if not data:  # the successor's process is gone
            self._peer_left = True
            if not failures.PROGRESS.finished:  # past the last collective every worker may leave
                self._report(f"error: rank {self.peer} exited at step {self._at()}")
            return
        self._pending += data
        while len(self._pending) >= FRAME.size:
            kind, step, ops = FRAME.unpack_from(self._pending)
            self._pending = self._pending[FRAME.size:]
            self._heard = time.monotonic()
            if kind == DONE:
                self._peer_left = True
            elif kind == ABORT:  # someone aborts and said why: pass it on, report nothing
                self._peer_left = True
                self._send(ABORT)
            elif ops != self._ops:
                self._step, self._ops, self._behind_since = step, ops, None

    def _check(self, now: float) -> None:
        if now - self._heard > self._limit:
            self._report(f"error: rank {self.peer} stalled: no heartbeat for {self.timeout_s:g} s at step "
                         f"{self._at()} (stopped, frozen, or holding the GIL in a C call)")
            if self._peer_here:  # a frozen process ends with no signal but SIGKILL: send it, once this
                # worker's own failure had time to be the one a launcher reports (mpirun kills it anyway)
                killer = threading.Timer(FROZEN_KILL_S, _kill, args=(self._peer_pid,))
                killer.daemon = True
                killer.start()
        elif self._ops < failures.PROGRESS.collectives:  # behind this worker, which waits for it
            if self._behind_since is None:
                self._behind_since = now
            elif now - self._behind_since > self._limit and now - self._heard < 10 * BEAT_S:  # silent: frozen
                self._report(f"error: rank(s) {self.peer} stalled: no progress for {self.timeout_s:g} s at step "
                             f"{self._at()} while the other ranks wait in its collective (comm.timeout_s)")
        else:
            self._behind_since = None

    def _at(self) -> int:
        """The step the successor is on: this worker's own, which waits for it (its heartbeats
        may be a beat old), or the successor's, if it was further."""
        return max(failures.PROGRESS.step, self._step)

    def _report(self, line: str) -> None:
        if self._failed or self._halt.is_set():
            return
        self._failed = self._peer_left = True
        self._send(ABORT)  # this worker ends the job: its watcher must not take that for the cause
        self._fail(f"{line}; aborting all {self.world} ranks")

    def _send(self, kind: int) -> None:
        with self._send_lock:
            try:
                self._up.sendall(FRAME.pack(kind, failures.PROGRESS.step, failures.PROGRESS.collectives))
            except OSError:
                pass  # the watcher is gone: its own watcher reports it

    def aborting(self) -> None:
        """This worker aborts the job (failures.abort_world): say so before leaving."""
        self._halt.set()
        self._send(ABORT)

    def close(self) -> None:
        """A clean end: the watcher is told this worker is done."""
        if not self._halt.is_set():
            self._halt.set()
            self._send(DONE)
        self.join(timeout=2)
        failures.off_abort(self.aborting)
        for s in (self._up, self._down):
            s.close()


def own_address() -> str:
    """An address of this host that the others can reach: its name's, unless that is a
    loopback address (then the one of the interface with the default route)."""
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        address = "127.0.0.1"
    if address.startswith("127."):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks a route
                address = s.getsockname()[0]
        except OSError:
            pass
    return address


def _exchange(comm: Communicator, address: str, port: int) -> torch.Tensor:
    """Every rank's (port, pid, address) through one allreduce of a fixed-size table (the
    pids make rank 0's row, the job's token, differ between jobs)."""
    table = torch.zeros(comm.world_size, 2 + ADDRESS_BYTES, dtype=torch.int64)
    raw = address.encode()[:ADDRESS_BYTES]
    table[comm.rank, 0], table[comm.rank, 1] = port, os.getpid()
    table[comm.rank, 2:2 + len(raw)] = torch.tensor(list(raw), dtype=torch.int64)
    comm.allreduce(table)
    return table


def _address_of(row: torch.Tensor) -> tuple[str, int]:
    raw = bytes(int(b) for b in row[2:] if int(b))
    return raw.decode(), int(row[0])


def _connect(row: torch.Tensor, deadline: float) -> socket.socket:
    address = _address_of(row)
    while True:
        try:
            s = socket.create_connection(address, timeout=max(deadline - time.monotonic(), 1.0))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(None)
            return s
        except OSError as e:
            if time.monotonic() > deadline:
                raise PeerFailure(f"the watchdog cannot reach rank at {address[0]}:{address[1]}: {e}") from None
            time.sleep(0.1)


def _accept(listener: socket.socket, token: bytes, rank: int, deadline: float) -> socket.socket:
    """The connection from `rank` (a stray connection without this job's hello is dropped)."""
    while True:
        listener.settimeout(max(deadline - time.monotonic(), 0.1))
        s = None
        try:
            s, _ = listener.accept()
            s.settimeout(2.0)  # a stray connection that says nothing is dropped, not waited for
            hello = b""
            while len(hello) < HELLO.size:
                chunk = s.recv(HELLO.size - len(hello))
                if not chunk:
                    break
                hello += chunk
        except OSError:
            if s is not None:
                s.close()
            if time.monotonic() > deadline:
                raise PeerFailure(f"rank {rank} did not join the watchdog's ring in time") from None
            continue
        if len(hello) == HELLO.size and HELLO.unpack(hello) == (token, rank):
            s.settimeout(None)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s
        s.close()
