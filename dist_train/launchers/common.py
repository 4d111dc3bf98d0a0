"""What every launcher shares: the checks made before any worker trains (the job's
arguments and the tools a launcher runs: args.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import config, data, failures, usercode
from ..comm import broadcast_bytes
from ..device import Choice, for_worker
from ..errors import UserError
from ..files import OutLock, check_unlocked
from ..train import validate
from ..train.outputs import prepare_out_dir
from .args import default_out


@dataclass
class Job:
    cfg: config.Section
    dataset: data.Dataset | data.Items
    outputs: int | None  # the model's output width, decided from the whole dataset
    out: Path | None
    resume: bool
    lock: OutLock | None = None  # held while the job lasts, by the process that writes its outputs
    device: Choice | None = None  # this worker's (on_device)

    def on_device(self, local_rank: int = 0, local_size: int = 1, assigned=None, pool=None) -> Job:
        """This job with this worker's device chosen (device.for_worker); where the setting
        cannot be met, its one-line ConfigError, the lock let go."""
        try:
            self.device = for_worker(self.cfg, local_rank, local_size, assigned=assigned, pool=pool)
        except UserError:
            if self.lock is not None:
                self.lock.release()
            raise
        return self

    def worker_data(self):
        """This worker's data: a user's dataset whole (the core asks it only for its rows),
        or the arrays' rows."""
        if isinstance(self.dataset, data.Items):
            return self.dataset
        return data.WorkerData.whole(self.dataset, self.outputs, resident=self.cfg.data.resident_mb << 20,
                                     window=self.cfg.data.shuffle_window)

    @property
    def data_workers(self) -> int:
        """The data processes each worker starts (data.workers, for a user's dataset)."""
        return self.dataset.workers if isinstance(self.dataset, data.Items) else 0


def out_dir(args, check_lock: bool = False) -> Path:
    """The run directory: --out, or a new runs/CONFIG-TIMESTAMP; --resume needs an explicit
    one. `check_lock`: first refuse an --out another run holds (say that, not what its
    files look like)."""
    if args.resume and not args.out:
        raise UserError("--resume needs --out DIR: the run directory to continue")
    if check_lock and args.out:
        check_unlocked(args.out)
    return prepare_out_dir(args.out or default_out(args.config), args.resume)


def prepare(args, world_size: int, lock: str | None = "hold") -> Job:
    """Everything checked before a worker trains: config, world, data, model, output dir.
    `lock`: "hold" takes --out for this process (the one that writes the run), "check"
    only fails if another run holds it, None leaves it (another process holds it)."""
    usercode.search_config_dir(args.config)  # user code beside the config imports
    cfg = config.load(args.config, args.set)
    config.check_world(cfg, world_size)
    return prepare_job(cfg, world_size, out_dir(args, check_lock=lock is not None), args.resume, lock)


def prepare_job(cfg, world_size: int, out: Path | None, resume: bool, lock: str | None = "hold", *,
                model=None, data_given=None, loss=None) -> Job:
    """prepare() for a loaded config and an output directory (None: write nothing); `model`,
    `data_given` and `loss` stand in for what the config names (the Python API)."""
    config.check_world(cfg, world_size)
    failures.PROGRESS.started = True  # from here user code runs: its sys.exit is a failure, not a request
    ds = data.load(cfg, data_given)
    if getattr(ds, "label_names", None) and not cfg.data.label_map:
        cfg.data["label_map"] = list(ds.label_names)  # string classes: their names travel with the model
    outputs = validate.check(cfg, ds, model, loss)
    held = None
    if lock == "hold" and out is not None:
        held = OutLock(out).acquire()
        try:
            prepare_out_dir(out, resume)  # again, now that no other run can start on it
        except UserError:
            held.release()
            raise
    return Job(cfg, ds, outputs, out, resume, held)


def prepare_everywhere(comm, make_job):
    """`make_job()` on every worker; all go on, or all raise the same UserError (said once,
    by the first worker that found it), so no worker waits for one that gave up."""
    job, problem = None, None
    try:
        job = make_job()
    except UserError as e:
        problem = str(e)
    flags = torch.zeros(comm.world_size, dtype=torch.float64)
    flags[comm.rank] = 1.0 if problem is not None else 0.0
    comm.allreduce(flags)  # dist: who could not start
    failed = [r for r, f in enumerate(flags.tolist()) if f]
    if not failed:
        return job
    first = failed[0]
    said = broadcast_bytes(comm, (problem or "").encode(), root=first).decode()
    same = torch.tensor([0.0 if problem == said else 1.0], dtype=torch.float64)
    comm.allreduce(same)  # dist: did every worker find the same problem?
    error = UserError(said if same.item() == 0 else f"[rank {first}] {said}")
    error.collective, error.speaker = True, first
    if job is not None and job.lock is not None:
        job.lock.release()
    raise error
