"""The training loop, written once for any Communicator (STYLE.md 1): setup, epochs, finish.

    shard -> per-epoch order -> local batch -> device -> forward -> loss scaled to the global
    mean -> backward -> one fused allreduce of [grads | stats] -> identical optimizer step

Lines marked `# dist:` are where this differs from a plain single-process loop.
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import config, failures, models, preempt
from ..errors import Preempted, UserError
from ..comm import gpu
from ..data import sharding
from ..device import Choice, for_worker, keep_heap
from . import checkpoint, losses, metrics, schedule
from .agree import agree_at_start, check_parameters
from .clock import Clock, job_start
from .evaluate import evaluate
from .gradsync import FusedGrads, broadcast_parameters, settle_buffers
from .optim import make_optimizer
from .outputs import RunWriter
from .scaler import LossScale
from .state import Position, checkpoint_state, restore, resumable, well_formed
from .step import Step
from .summary import done_line, epoch_record, eval_record, step_record, summary


@dataclass
class Result:
    """What fit returns on every worker; rank 0's is the run's."""

    state_dict: dict
    summary: dict
    model: torch.nn.Module = field(repr=False)

    def model_payload(self, cfg) -> dict:
        return {"state_dict": self.state_dict, "config": config.to_dict(cfg), "meta": self.summary["meta"]}


@dataclass
class Run:
    """Everything one worker's training holds."""

    cfg: config.Section
    comm: object
    data: object
    launcher: str
    threads: int | None
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    grads: FusedGrads
    writer: RunWriter
    pos: Position
    resumed: bool
    plan: np.ndarray  # the global sample count of each step of an epoch
    step: Step
    clock: Clock
    started: float
    loss: losses.Loss
    metrics: list
    given_model: object = None  # the model given to fit, if it was (not from the config)
    scaler: LossScale | None = None  # fp16's loss scale
    choice: Choice | None = None  # how this worker's device was chosen
    devices: str = ""  # every worker's device (a world with a GPU in it)
    stopped_by: str = "epochs"
    stop: tuple = ()  # (rank, signal) of each worker asked to stop, as the step's tail told all
    fingerprint: dict = field(default_factory=dict)  # the data's (checkpoints keep it: a resume checks it)
    last_eval: int = -1  # the step the held-out rows were last scored at
    job_started: float = 0.0  # epoch seconds: the metrics' wall clock (clock.job_start)

    @property
    def total_steps(self) -> int:
        """What a cosine schedule decays over."""
        t = self.cfg.train
        return min(t.epochs * len(self.plan), t.max_steps or t.epochs * len(self.plan))


def fit(cfg, comm, data, *, out_dir=None, resume: bool = False, launcher: str = "local", local_rank: int = 0,
        local_size: int = 1, device: Choice | None = None, threads: int | None = None, fence=None,
        quiet: bool = False, model=None, loss=None, on_record=None, job_started: float | None = None) -> Result:
    """Train `cfg` on this worker's `data` (a data.WorkerData, or data.Items) with peers
    reachable through `comm`.

    `model` (an nn.Module or a factory) and `loss` (fn(outputs, targets) -> per-sample
    losses) stand in for what the config names; `fence`, if given, is asked before each
    write whether this run still owns --out; `quiet` prints nothing (the Spark driver
    shows progress from metrics.jsonl instead); `on_record`, if given, gets rank 0's
    metrics records as they are logged (the Spark driver's progress without --out).
    `device`: the launcher's device.Choice for this worker; without it, device.for_worker
    picks from `local_rank` of `local_size` workers on this host. `job_started`: when the
    job began (epoch seconds; default: the wrapper's record, else now), the metrics' `wall` clock."""
    choice = device if device is not None else for_worker(cfg, local_rank, local_size)
    run = setup(cfg, comm, data, out_dir=out_dir, resume=resume, launcher=launcher, choice=choice,
                threads=threads, fence=fence, quiet=quiet, given=(model, loss), on_record=on_record)
    run.job_started = job_started if job_started is not None else job_start(default=time.time())
    failures.PROGRESS.training = True  # from here a worker that leaves fails the job
    stop_file = run.writer.out / preempt.STOP_FILE if run.writer.active else None  # rank 0 looks for it
    try:
        with preempt.catching(stop_file):  # (through finish too: a signal there lets the run end as it is)
            while run.pos.epoch < cfg.train.epochs and run.stopped_by == "epochs":
                run_epoch(run)
            if run.stop:
                stop(run)
            return finish(run)
    except BaseException as e:
        run.writer.tracking_failed(killed=isinstance(e, Preempted))  # MLflow: KILLED or FAILED, not RUNNING
        raise


def setup(cfg, comm, data, *, out_dir, resume, launcher, choice: Choice, threads, fence, quiet, given,
          on_record=None) -> Run:
    started = time.perf_counter()
    failures.PROGRESS.step, failures.PROGRESS.finished, failures.PROGRESS.started = 0, False, True
    config.check_world(cfg, comm.world_size)
    keep_heap()  # the steps' memory reused, not faulted in afresh, under every launcher
    device = choice.device
    if device.type == "cuda":
        torch.cuda.set_device(device)  # kernels, pinned memory and NCCL on this worker's GPU
    comm, devices = gpu.for_device(comm, device, timeout_s=cfg.comm.timeout_s, nccl=cfg.comm.nccl)
    torch.manual_seed(cfg.seed)
    model = models.build(cfg, data.sample_shape, data.outputs, given=given[0]).to(device)
    loss = losses.resolve(cfg.train.loss, given[1])
    measures = metrics.resolve(cfg.train.metrics, loss)
    optimizer = make_optimizer(cfg, model)
    writer = RunWriter(out_dir, active=comm.rank == 0, fence=fence, stream=None if quiet else sys.stdout,
                       tensorboard=cfg.log.tensorboard, on_record=on_record)
    scaler = LossScale(cfg.train.loss_scale, cfg.train.loss_scale_growth_every) \
        if cfg.train.precision == "fp16" else None
    plan = sharding.step_samples(n=data.n, seed=cfg.seed, world=comm.world_size, batch_size=cfg.train.batch_size,
                                 accumulate=cfg.train.accumulate, eval_fraction=cfg.data.eval_fraction,
                                 sampling=cfg.data.sampling)
    ckpt = newest_checkpoint(writer, len(plan) * cfg.train.accumulate, cfg) if resume and out_dir else None
    pos = restore(ckpt, model, optimizer, cfg, comm.world_size, scaler) if ckpt is not None else Position()
    fingerprint = data.fingerprint()
    agree_at_start(comm, cfg, fingerprint, pos.step)  # dist: one config, data and start, before any buffer
    if ckpt is not None:
        resumable(ckpt, pos, fingerprint, cfg)  # every worker alike (they agree on data and config)
    broadcast_parameters(comm, model)  # dist: every worker starts from rank 0's weights
    grads = FusedGrads(model, comm, grads_in_place=cfg.train.precision == "fp32",  # autocast: autograd's own path
                       metrics=len(measures))
    writer.start_metrics(pos.step if ckpt is not None else None)
    writer.start_tracking(cfg, ckpt.get("mlflow_run_id") if ckpt is not None else None, launcher, comm.world_size)
    step = Step(cfg, comm, model, optimizer, grads, loss, measures, device, writer.log, scaler)
    run = Run(cfg, comm, data, launcher, threads, device, model, optimizer, grads, writer, pos, ckpt is not None,
              plan, step, Clock(comm.world_size, pos.samples), started, loss, measures, given[0], scaler=scaler,
              choice=choice, devices=devices, fingerprint=fingerprint)
    writer.log(f"[dist-train] {launcher}: world {comm.world_size}, device {choice}"
               + (f"; {devices}" if devices else "") + ", "
               f"threads {threads or torch.get_num_threads()}, {data.n} rows, "
               f"{sum(p.numel() for p in model.parameters())} parameters"
               + (f", resumed at step {pos.step} (epoch {pos.epoch})" if run.resumed else ""))
    model.train()
    return run


def newest_checkpoint(writer: RunWriter, batches_per_epoch: int, cfg) -> dict | None:
    """The newest checkpoint in --out that verifies and is well formed (the older ones are
    tried in turn); UserError where there are checkpoints but none of them is usable."""
    ckpt = checkpoint.latest(writer.checkpoint_dir, warn=writer.log,
                             check=lambda c: well_formed(c, batches_per_epoch, cfg))
    if ckpt is None and checkpoint.listing(writer.checkpoint_dir):
        raise UserError(f"--resume: every checkpoint in {writer.checkpoint_dir} is corrupt or unreadable; "
                        f"nothing to continue from (drop --resume to start again)")
    return ckpt


def run_epoch(run: Run) -> None:
    """Steps until the epoch ends or training stops."""
    cfg, pos, t = run.cfg, run.pos, run.cfg.train
    batches = sharding.epoch_batches(
        n=run.data.n, seed=cfg.seed, epoch=pos.epoch, rank=run.comm.rank, world=run.comm.world_size,
        batch_size=t.batch_size, eval_fraction=cfg.data.eval_fraction, sampling=cfg.data.sampling, shuffle=t.shuffle,
        window=cfg.data.shuffle_window)
    feed = run.data.feed(pos.epoch, batches[pos.batch:], run.device)  # fetched ahead where it can be
    while True:
        if t.max_steps is not None and pos.step >= t.max_steps:
            run.stopped_by = "max_steps"  # also when resumed at the limit: no extra step
            return
        if pos.batch == 0:  # a new epoch's first step
            pos.epoch_loss, pos.epoch_count = 0.0, 0
            run.clock.epoch_start = time.perf_counter()
        index = pos.batch // t.accumulate
        lr = schedule.lr_at(t, pos.step, run.total_steps)
        logged = bool(t.log_every) and (pos.step + 1) % t.log_every == 0  # accuracy is only needed there
        stats = run.step(pos.step + 1, itertools.islice(feed, t.accumulate), int(run.plan[index]), lr, logged)
        advance(run, stats, lr, last_of_epoch=index + 1 == len(run.plan))
        if pos.batch == 0 or run.stopped_by != "epochs":
            return


def advance(run: Run, stats, lr: float, last_of_epoch: bool) -> None:
    """Book the step just taken: position, time, checks, logs, checkpoints."""
    cfg, pos, t, writer = run.cfg, run.pos, run.cfg.train, run.writer
    pos.step += 1
    pos.batch += t.accumulate
    if not stats.nonfinite_ranks:
        pos.samples += stats.count
        pos.epoch_loss += stats.loss * stats.count
        pos.epoch_count += stats.count
    now = run.clock.step_done(run.step.last_times, stats.times, pos.samples)
    if last_of_epoch:
        pos.epoch, pos.batch = pos.epoch + 1, 0
    if cfg.comm.check_every_steps and pos.step % cfg.comm.check_every_steps == 0:
        check_parameters(run.comm, run.model, pos.step)
    if t.target_loss is not None and stats.loss <= t.target_loss:
        run.stopped_by = "target_loss"  # the same global loss on every worker: all stop together
    if stats.stop:
        run.stopped_by, run.stop = "signal", stats.stop  # every worker saw the same tail: all stop here
    if t.log_every and pos.step % t.log_every == 0:
        rec = step_record(run, stats, lr)
        writer.metric(rec)
        if not writer.tty:  # a terminal shows the progress bar instead
            writer.log(f"step {pos.step:>6}  epoch {rec['epoch']:>3}  loss {stats.loss:.5f}  "
                       f"{rec['samples_per_sec']:,.0f} samples/s")
    if writer.tty:
        done = pos.batch if pos.batch else len(run.plan) * t.accumulate
        writer.progress(pos.epoch if pos.batch else pos.epoch - 1, -(-done // t.accumulate), len(run.plan),
                        stats.loss, (pos.samples - run.clock.samples_at_start) / max(now - run.clock.start, 1e-9),
                        now - run.clock.epoch_start)
    if cfg.checkpoint.every_steps and pos.step % cfg.checkpoint.every_steps == 0:
        save_checkpoint(run)
    if pos.batch == 0:  # the epoch just ended
        writer.metric(epoch_record(pos))
    every = t.eval_every
    if cfg.data.eval_fraction > 0 and (pos.step % every == 0 if every else every is None and pos.batch == 0):
        held_out(run)


def held_out(run: Run, result: dict | None = None) -> dict:
    """Score the held-out rows now (every worker) and log it as an `eval` line; the time it
    takes is left out of the speed."""
    t0 = time.perf_counter()
    if result is None:
        settle_buffers(run.comm, run.model)  # dist: every worker scores the same statistics
        result = evaluate(run.cfg, run.comm, run.model, run.data, run.device, run.loss, run.metrics)
    run.writer.metric(eval_record(run, result))
    run.last_eval = run.pos.step
    spent = time.perf_counter() - t0
    run.clock.exclude(spent)
    run.step.pause(spent)
    return result


def save_checkpoint(run: Run) -> None:
    """Rank 0 checkpoints where training stands (every worker takes part: the buffers)."""
    settle_buffers(run.comm, run.model)  # dist: one set of BatchNorm statistics in the checkpoint
    state = checkpoint_state(run.model, run.optimizer, run.pos, run.cfg, run.comm.world_size, run.scaler,
                             data=run.fingerprint)
    run.writer.checkpoint(run.pos.step, state, run.cfg.checkpoint.keep)


def stop(run: Run) -> None:
    """A stop was asked (preempt.py): the checkpoint of the step every worker just finished
    (unless it was written already), then every worker raises Preempted."""
    pos, cfg = run.pos, run.cfg
    run.clock.stop()
    if not (cfg.checkpoint.every_steps and pos.step % cfg.checkpoint.every_steps == 0):
        save_checkpoint(run)
    run.writer.close()
    rank, signum = run.stop[0]
    where = (f"checkpoint {run.writer.checkpoint_dir / checkpoint.name(pos.step)} written; continue with --resume"
             if run.writer.checkpoint_dir is not None else "no --out, so nothing was saved")
    raise Preempted(signum, pos.step, where, rank if run.comm.world_size > 1 else None)


def finish(run: Run) -> Result:
    """The last checkpoint, evaluation, the summary and (rank 0) model.pt."""
    cfg, writer = run.cfg, run.writer
    run.clock.stop()
    save_checkpoint(run)  # (and every worker evaluates and saves the same BatchNorm statistics)
    evaluation = evaluate(cfg, run.comm, run.model, run.data, run.device, run.loss, run.metrics)
    if cfg.data.eval_fraction > 0 and run.last_eval != run.pos.step:
        held_out(run, evaluation)  # the curve's last point
    failures.PROGRESS.training, failures.PROGRESS.finished = False, True  # the last collective is behind us
    report = summary(run, evaluation, time.perf_counter() - run.started)
    writer.close()
    result = Result({k: v.detach().cpu() for k, v in run.model.state_dict().items()}, report, run.model)
    writer.final(result.model_payload(cfg), report)
    writer.finish_tracking(report, result.model_payload(cfg))
    writer.log(done_line(report))
    return result
