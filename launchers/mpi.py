"""MPI launcher: N ranks under mpirun, gradients summed in shared memory among the ranks
of a host (comm.shm) and with MPI Allreduce across hosts.

    mpirun -n 2 --bind-to none python launchers/mpi.py conf/digits.yaml --out runs/digits-mpi
    dist-train mpi -n 2 conf/digits.yaml --out runs/digits-mpi     (adds the flags for you)

Success: rank 0 prints `[dist-train] done: ...` and mpirun exits 0; only rank 0 writes
runs/digits-mpi/. If any rank fails, every rank is stopped within seconds, mpirun exits
non-zero, and stderr holds `[rank R] ...` with that rank's traceback.

This is the only module that imports mpi4py.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from mpi4py import MPI

from dist_train import cli, runtime, shm
from dist_train.comm import Communicator, SharedGradsMixin
from dist_train.engine import WorkerData, fit
from dist_train.errors import TrainingError, UserError


class MPIComm(SharedGradsMixin, Communicator):
    """Buffer-based collectives: contiguous CPU tensors go to MPI without a copy.

    With `timeout_s`, a watchdog catches a rank that stops making progress without dying
    (stuck in user code, sleeping): every rank counts the collectives it enters, and a
    thread of its own tells rank 0 the count and step (a 16-byte non-blocking message on a
    duplicate communicator) every BEAT_S when they changed, so the step's path makes no
    MPI call for it (on ranks other than 0 an Isend there cost ~40 us a step, a fifth of
    LeNet's exchange). Rank 0's watchdog thread names the ranks that have been behind
    another, without progress, for longer than the timeout, and the step, and aborts the job.
    MPI itself would wait forever.

    With `use_shm`, the gradient buffer of the ranks of one host lives in shared memory
    (shm.SharedGrads): they sum it without MPI, and local rank i of every host sums part
    i across hosts with MPI Allreduce."""

    HEARTBEAT = 7
    BEAT_S = 0.1  # how often a rank's heartbeat thread reports its progress, and the watchdog looks

    def __init__(self, comm=MPI.COMM_WORLD, timeout_s: float | None = None, use_shm: bool = False, local=None):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()
        # the ranks of this host (`local`: a given split, so a test can pose as several hosts)
        self.local = local if local is not None else comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = self.local.Get_rank(), self.local.Get_size()
        self.timeout_s = timeout_s
        self.use_shm = use_shm and self.world_size > 1 and shm.supported()
        self.cross = None  # local rank i of every host, for part i of the shared gradients
        self.step = 0  # set by the training loop: the step a collective belongs to
        self.ops = 0  # collectives entered
        self._watchdog = self._beats = None
        if timeout_s and self.world_size > 1:
            self.monitor = comm.Dup()
            if self.rank == 0:
                self._watchdog = _Watchdog(self, timeout_s)
            else:
                self._beats = _Heartbeats(self)

    def _enter(self):
        self.ops += 1
        if self._watchdog is not None:
            self._watchdog.seen(0, self.ops, self.step)

    def grad_buffer(self, numel, dtype, device):
        if not self.use_shm or device.type != "cpu":
            return super().grad_buffer(numel, dtype, device)
        comm = self.comm
        parts = comm.allreduce(self.local_size, op=MPI.MIN)  # gradient parts that cross hosts in parallel
        self.hosts = comm.allreduce(1 if self.local_rank == 0 else 0)
        cross = comm.Split(self.local_rank if self.local_rank < parts else MPI.UNDEFINED, key=self.rank)
        if cross != MPI.COMM_NULL and cross.Get_size() > 1:
            self.cross = cross
        token = comm.bcast(uuid.uuid4().hex if self.rank == 0 else None)
        local_ranks = self.local.allgather(self.rank)
        # the watchdog names a stalled rank with its step first; this is the backstop
        timeout = None if self.timeout_s is None else self.timeout_s + 10
        return self._open_grads(shm.SHM_DIR / f"dist-train-{token}-{local_ranks[0]}-grads", numel, dtype, device,
                                timeout, [f"rank {r}" for r in local_ranks], parts,
                                lambda ok: comm.allreduce(ok, op=MPI.LAND))

    @property
    def _across_hosts(self):
        cross = self.cross
        return None if cross is None else (lambda part: cross.Allreduce(MPI.IN_PLACE, part))

    def allreduce(self, buf):
        self._enter()
        if buf.device.type == "cpu":
            self.comm.Allreduce(MPI.IN_PLACE, buf)
        else:  # MPI reduces host memory here: stage through the CPU
            host = buf.cpu()
            self.comm.Allreduce(MPI.IN_PLACE, host)
            buf.copy_(host)

    def broadcast(self, buf, root=0):
        self._enter()
        if buf.device.type == "cpu":
            self.comm.Bcast(buf, root=root)
        else:
            host = buf.cpu()
            self.comm.Bcast(host, root=root)
            buf.copy_(host)

    def barrier(self):
        self._enter()
        self.comm.Barrier()

    def abort(self, code=1):
        _abort(self.comm, code)

    def close(self):
        for thread in (self._watchdog, self._beats):
            if thread is not None:
                thread.stop()


class _Heartbeats(threading.Thread):
    """The thread of a rank other than 0 that sends its progress (collectives entered,
    step) to rank 0's watchdog every BEAT_S, when it changed. Reported within BEAT_S
    (and the time to get the GIL), also while the training loop waits in a collective."""

    def __init__(self, comm: MPIComm):
        super().__init__(daemon=True, name="dist-train-heartbeats")
        self.c = comm
        self._halt = threading.Event()
        self.start()

    def stop(self):
        self._halt.set()
        self.join(timeout=5)

    def run(self):
        beat, sent, last = np.zeros(2, dtype=np.int64), None, (0, 0)
        while not self._halt.wait(MPIComm.BEAT_S):
            now = (self.c.ops, self.c.step)
            if now != last:
                if sent is not None:
                    sent.Wait()  # long done: an eager 16-byte message
                beat[:] = last = now
                sent = self.c.monitor.Isend(beat, dest=0, tag=MPIComm.HEARTBEAT)
        if sent is not None:
            sent.Wait()


class _Watchdog(threading.Thread):
    """Rank 0's thread: collects heartbeats, aborts the world on a stall (a rank that has
    been behind another, without progress, for timeout_s)."""

    def __init__(self, comm: MPIComm, timeout_s: float):
        super().__init__(daemon=True, name="dist-train-watchdog")
        self.c, self.timeout_s = comm, timeout_s
        self.ops = [0] * comm.world_size
        self.steps = [0] * comm.world_size
        self._halt = threading.Event()
        self.start()

    def seen(self, rank, ops, step):
        self.ops[rank], self.steps[rank] = ops, step

    def stop(self):
        self._halt.set()
        self.join(timeout=5)

    def run(self):
        beat = np.zeros(2, dtype=np.int64)
        status = MPI.Status()
        # since[r]: since when rank r is behind another without progress (reports lag by up to
        # BEAT_S: a rank behind that makes progress is not stalled)
        last, since = list(self.ops), [None] * len(self.ops)
        while not self._halt.is_set():
            while self.c.monitor.Iprobe(source=MPI.ANY_SOURCE, tag=MPIComm.HEARTBEAT, status=status):
                self.c.monitor.Recv(beat, source=status.Get_source(), tag=MPIComm.HEARTBEAT)
                self.seen(status.Get_source(), int(beat[0]), int(beat[1]))
            now, top = time.monotonic(), max(self.ops)
            for r, o in enumerate(self.ops):
                if o == top:
                    since[r] = None
                elif o != last[r] or since[r] is None:  # behind, and no progress from here on
                    since[r] = now
                last[r] = o
            behind = [r for r, t in enumerate(since) if t is not None and now - t > self.timeout_s]
            if behind:
                step = max(self.steps)
                print(f"error: rank(s) {', '.join(map(str, behind))} stalled: no progress for "
                      f"{self.timeout_s:g} s at step {step} while the other ranks wait in its collective "
                      f"(comm.timeout_s); aborting all {self.c.world_size} ranks", file=sys.stderr, flush=True)
                self.c.comm.Abort(1)
            self._halt.wait(MPIComm.BEAT_S)


def _prepare_everywhere(world, argv):
    """Check the job on every rank; all ranks agree to go on or all exit 2 (no one waits)."""
    job, problem = None, None
    try:
        args = cli.job_parser("launchers/mpi.py").parse_args(argv)
        job = cli.prepare(args, world.Get_size())
    except UserError as e:
        problem = str(e)
    problems = world.allgather(problem)  # dist: small metadata, pickled (lowercase call)
    failed = [(r, p) for r, p in enumerate(problems) if p]
    if failed:
        first_rank, first = failed[0]
        if world.Get_rank() == first_rank:
            everywhere = len(failed) == world.Get_size() and all(p == first for _, p in failed)
            print(f"error: {first}" if everywhere else f"error: [rank {first_rank}] {first}",
                  file=sys.stderr, flush=True)
        raise SystemExit(2)
    return job


def _train(world, argv) -> None:
    job = _prepare_everywhere(world, argv)
    comm = MPIComm(world, timeout_s=job.cfg.comm.timeout_s, use_shm=job.cfg.comm.shm)
    threads = runtime.set_threads(runtime.thread_budget(local_workers=comm.local_size, override=job.cfg.threads))
    try:
        fit(job.cfg, comm, WorkerData.whole(job.dataset, job.outputs), out_dir=job.out, resume=job.resume,
            launcher="mpi", local_rank=comm.local_rank, threads=threads)
    finally:
        comm.close()


def _abort(world, code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    world.Abort(code)


def _exit_with_parent(rank: int, interval_s: float = 0.5) -> None:
    """If mpirun is killed (kill -9 of the job), its ranks are orphaned and would train on:
    poll for a new parent and leave (TorchDistributor does the same for its children)."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                print(f"[rank {rank}] mpirun (pid {parent}) is gone; exiting", file=sys.stderr, flush=True)
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="dist-train-parent-watch").start()


def main(argv: list[str] | None = None) -> int:
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    _exit_with_parent(rank)
    try:
        _train(world, argv)
    except TrainingError as e:  # raised by every rank at the same step: no one waits, no abort needed
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(cli.TRAINING_ERROR_EXIT) from None
    except SystemExit as e:
        if e.code not in (0, None, 2):
            _abort(world, int(e.code) if isinstance(e.code, int) else 1)
        raise  # 0, or 2 after every rank agreed on the error: a clean exit
    except BaseException as e:  # noqa: BLE001 - any failure on any rank must end the whole world
        if isinstance(e, UserError):  # found by one rank mid-run: the others are waiting on it
            print(f"error: [rank {rank}] {e}", file=sys.stderr, flush=True)
            _abort(world, 2)
        if isinstance(e, shm.PeerFailure):  # another rank died or stalled: its failure, not this rank's
            print(f"error: {e}; aborting all {world.Get_size()} ranks", file=sys.stderr, flush=True)
            _abort(world, 1)
        detail = "".join(traceback.format_exception(e)).rstrip().replace("\n", f"\n[rank {rank}] ")
        print(f"[rank {rank}] {detail}\n[rank {rank}] error: rank {rank} failed with "
              f"{type(e).__name__}: {e}; aborting all {world.Get_size()} ranks", file=sys.stderr, flush=True)
        _abort(world, 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
