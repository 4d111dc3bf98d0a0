"""The Python API for a user's own script: `dist_train.fit(config, model=..., data=..., loss=...)`.

    # train.py
    import dist_train
    result = dist_train.fit("conf/mine.yaml", model=make_model, data=MyDataset(...), out_dir="runs/mine")

    python train.py                              a world of one
    mpirun -n 4 python train.py                  MPI (mpi4py), shared memory within a host
    srun -n 8 python train.py                    torch.distributed (gloo) at the job's first node
    torchrun --nproc-per-node 4 train.py         torch.distributed at torchrun's store

The same script runs unchanged under each: where it is comes from the launcher's
environment variables (comm.env.detect), MPI is used where mpi4py is importable under
mpirun, torch.distributed otherwise. Every worker returns a Result (`.model`, `.summary`).
In a world of one a failure raises as any Python call does; with peers it goes through
the failure policy (failures.py): one line, every worker stopped, the table's exit code.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .. import config, device, failures, usercode
from ..comm import connect, env
from ..errors import UserError
from ..files import check_unlocked
from ..train import Result
from ..train import fit as train
from ..train.outputs import prepare_out_dir
from .common import prepare_everywhere, prepare_job


def fit(config_or_path, *, model=None, data=None, loss=None, out_dir=None, resume: bool = False) -> Result:
    """Train on every worker of wherever this process runs; returns this worker's Result.

    `config_or_path`: a YAML path, a dict (nested or dotted keys) or a loaded config.
    `model`: an nn.Module or a factory (given `model.kwargs`, and `input_shape` and `outputs`
    where it takes them); `data`: a map-style dataset or a factory of one; `loss`:
    fn(outputs, targets) -> one loss per sample. Each stands in for what the config names.
    `out_dir`: where rank 0 writes the run (None: nothing is written); `resume`: continue it."""
    cfg = load_config(config_or_path)
    where = _environment()
    given = {"model": model, "data_given": data, "loss": loss}
    if where.world_size == 1:
        return _train(cfg, where, None, given, out_dir, resume)
    base, abort = None, failures_abort(where)
    if where.kind == "mpi":
        from ..comm import mpi

        base, where = mpi.world(), mpi.environment()
    holder: list[Result] = []
    failures.run(lambda: holder.append(_train(cfg, where, base, given, out_dir, resume)),
                 rank=lambda: where.rank, world=lambda: where.world_size, abort=abort)
    return holder[0]


def load_config(config_or_path):
    """A loaded config from a path, a dict or a loaded config."""
    if isinstance(config_or_path, config.Section):
        return config_or_path
    if isinstance(config_or_path, dict):
        return config.build(config_or_path)
    usercode.search_config_dir(config_or_path)
    return config.load(config_or_path)


def _environment() -> env.Environment:
    where = env.detect()
    if where.kind == "mpi" and importlib.util.find_spec("mpi4py") is None:
        raise UserError("running under mpirun, but mpi4py is not installed: pip install 'dist-train[mpi]' "
                        "(or start the script with torchrun or srun)")
    return where


def failures_abort(where: env.Environment):
    if where.kind == "mpi":
        from ..comm import mpi

        return mpi.abort
    return lambda code: None  # torch.distributed: leaving is enough, the peers' watchdogs see it


def _train(cfg, where, base, given, out_dir, resume) -> Result:
    comm = connect(where, timeout_s=cfg.comm.timeout_s, shm=cfg.comm.shm, base=base,
                   fail=_fail(where))
    out = Path(out_dir) if out_dir is not None else None

    def make_job():
        if out is not None:
            check_unlocked(out)  # a run in progress there: say that, not what its files look like
            prepare_out_dir(out, resume)
        job = prepare_job(cfg, comm.world_size, out, resume, lock="hold" if comm.rank == 0 else None, **given)
        return job.on_device(where.local_rank, where.local_size)

    job = prepare_everywhere(comm, make_job)  # every worker goes on, or all stop with one line
    threads = device.set_threads(device.thread_budget(where.local_size, override=cfg.threads,
                                                      data_workers=job.data_workers))
    try:
        with failures.leaving(comm):
            return train(cfg, comm, job.worker_data(), out_dir=out, resume=resume, launcher=where.kind,
                         device=job.device, threads=threads, model=given["model"], loss=given["loss"])
    finally:
        if job.lock is not None:
            job.lock.release()


def _fail(where: env.Environment):
    """How a watchdog ends this world: MPI_Abort under MPI; else its own default (say the
    line, leave the process: the peers see it go)."""
    if where.kind == "mpi":
        from ..comm import mpi

        return lambda line: (failures.say(line), mpi.abort(1))
    return None
