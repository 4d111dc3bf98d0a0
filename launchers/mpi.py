"""MPI launcher: N ranks under mpirun, gradients summed with MPI Allreduce.

    mpirun -n 2 --bind-to none python launchers/mpi.py conf/digits.yaml --out runs/digits-mpi
    dist-train mpi -n 2 conf/digits.yaml --out runs/digits-mpi     (adds the flags for you)

Success: rank 0 prints `[dist-train] done: ...` and mpirun exits 0; only rank 0 writes
runs/digits-mpi/. If any rank fails, every rank is stopped within seconds, mpirun exits
non-zero, and stderr holds `[rank R] ...` with that rank's traceback.

This is the only module that imports mpi4py.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpi4py import MPI

from dist_train import cli, runtime
from dist_train.comm import Communicator
from dist_train.engine import WorkerData, fit
from dist_train.errors import UserError


class MPIComm(Communicator):
    """Buffer-based collectives: contiguous CPU tensors go to MPI without a copy."""

    def __init__(self, comm=MPI.COMM_WORLD):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()

    def allreduce(self, buf):
        if buf.device.type == "cpu":
            self.comm.Allreduce(MPI.IN_PLACE, buf)
        else:  # MPI reduces host memory here: stage through the CPU
            host = buf.cpu()
            self.comm.Allreduce(MPI.IN_PLACE, host)
            buf.copy_(host)

    def broadcast(self, buf, root=0):
        if buf.device.type == "cpu":
            self.comm.Bcast(buf, root=root)
        else:
            host = buf.cpu()
            self.comm.Bcast(host, root=root)
            buf.copy_(host)

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code=1):
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


def host_layout(comm=MPI.COMM_WORLD) -> tuple[int, int]:
    """(this rank's index on its host, ranks on its host), from MPI itself."""
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return local.Get_rank(), local.Get_size()
    finally:
        local.Free()


def _prepare_everywhere(comm: MPIComm, argv):
    """Check the job on every rank; all ranks agree to go on or all exit 2 (no one waits)."""
    job, problem = None, None
    try:
        args = cli.job_parser("launchers/mpi.py").parse_args(argv)
        job = cli.prepare(args, comm.world_size)
    except UserError as e:
        problem = str(e)
    problems = comm.comm.allgather(problem)  # dist: small metadata, pickled (lowercase call)
    failed = [(r, p) for r, p in enumerate(problems) if p]
    if failed:
        first_rank, first = failed[0]
        if comm.rank == first_rank:
            everywhere = len(failed) == comm.world_size and all(p == first for _, p in failed)
            print(f"error: {first}" if everywhere else f"error: [rank {first_rank}] {first}",
                  file=sys.stderr, flush=True)
        raise SystemExit(2)
    return job


def _train(comm: MPIComm, argv) -> None:
    job = _prepare_everywhere(comm, argv)
    local_rank, local_size = host_layout()
    threads = runtime.set_threads(runtime.thread_budget(local_workers=local_size, override=job.cfg.threads))
    fit(job.cfg, comm, WorkerData.whole(job.dataset, job.outputs), out_dir=job.out, resume=job.resume,
        launcher="mpi", local_rank=local_rank, threads=threads)


def main(argv: list[str] | None = None) -> int:
    comm = MPIComm()
    try:
        _train(comm, argv)
    except SystemExit as e:
        if e.code not in (0, None, 2):
            comm.abort(int(e.code) if isinstance(e.code, int) else 1)
        raise  # 0, or 2 after every rank agreed on the error: a clean exit
    except BaseException as e:  # noqa: BLE001 - any failure on any rank must end the whole world
        if isinstance(e, UserError):  # found by one rank mid-run: the others are waiting on it
            print(f"error: [rank {comm.rank}] {e}", file=sys.stderr, flush=True)
            comm.abort(2)
        detail = "".join(traceback.format_exception(e)).rstrip().replace("\n", f"\n[rank {comm.rank}] ")
        print(f"[rank {comm.rank}] {detail}\n[rank {comm.rank}] error: rank {comm.rank} failed with "
              f"{type(e).__name__}: {e}; aborting all {comm.world_size} ranks", file=sys.stderr, flush=True)
        comm.abort(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
