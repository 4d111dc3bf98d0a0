"""The training core: one loop, written once for any `Communicator` (STYLE.md 1).

    shard -> per-epoch order -> local batch -> device -> forward -> summed loss -> backward
    -> fused allreduce of [grads | count, loss, correct, more] -> divide by global count
    -> identical optimizer step everywhere

Lines marked `# dist:` are where this differs from a plain single-process loop.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import checkpoint, config, hoststep, losses, models, schedule, sharding
from .errors import TrainingError, UserError
from .gradsync import TIMES, FusedGrads, broadcast_parameters, parameter_checksums
from .outputs import RunWriter, write_final
from .runtime import resolve_device

STEADY_SKIP = 5  # steps left out of the steady-state speed (warm-up, allocator growth)


@dataclass
class WorkerData:
    """This worker's view of the dataset: rows [offset, offset + len(x)) of a source of n rows."""

    x: np.ndarray
    y: np.ndarray
    n: int
    outputs: int
    offset: int = 0

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def batch(self, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Global row indices -> tensors on the device (data context -> model context)."""
        local = rows - self.offset if self.offset else rows
        xb = torch.from_numpy(np.ascontiguousarray(self.x[local]))
        yb = torch.from_numpy(np.ascontiguousarray(self.y[local]))
        if device.type == "cuda":
            xb, yb = xb.pin_memory(), yb.pin_memory()
        return xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)

    @classmethod
    def whole(cls, ds, outputs: int) -> "WorkerData":
        return cls(ds.x, ds.y, len(ds), outputs)


class _Ahead:
    """The next step's first batch, gathered while this worker waits for slower peers at
    the exchange (`fetch` is the idle work a shared-memory exchange runs then: while a peer
    arrives, or else while one finishes its part of the sum), so the next step does not
    wait for its data. Its seconds count as waiting for peers (spent inside that wait),
    not as the step's data time (blocked on a batch)."""

    def __init__(self, data: WorkerData, device: torch.device):
        self.data, self.device, self.rows, self.batch = data, device, None, None

    def arm(self, rows: np.ndarray):
        self.rows, self.batch = rows, None
        return self.fetch

    def fetch(self) -> None:
        self.batch = self.data.batch(self.rows, self.device)

    def take(self, rows: np.ndarray):
        """The batch of `rows` if it was fetched ahead, else None."""
        if self.batch is None or self.rows is not rows:
            return None
        batch, self.batch = self.batch, None
        return batch


@dataclass
class Result:
    """What fit returns on every worker; rank 0's is the run's."""

    state_dict: dict
    summary: dict
    model: torch.nn.Module = field(repr=False)

    def model_payload(self, cfg) -> dict:
        return {"state_dict": self.state_dict, "config": config.to_dict(cfg), "meta": self.summary["meta"]}


def make_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD or Adam; on the CPU their fused kernels (one pass over parameter, gradient and
    state instead of one per operation: the wide MLP's SGD step 14 -> 9 ms)."""
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if params and params[0].device.type == "cpu" and FUSED_CPU_OPTIMIZERS else {}
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, **fused)
    return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, **fused)


FUSED_CPU_OPTIMIZERS = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)


@dataclass
class Position:
    """Where training stands: the next step to run."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch: int = 0  # index of the next local batch within the epoch
    samples: int = 0  # training samples seen, all workers
    epoch_loss: float = 0.0  # loss summed over the current epoch's samples
    epoch_count: int = 0


def fit(cfg, comm, data: WorkerData, *, out_dir=None, resume: bool = False, launcher: str = "local",
        local_rank: int = 0, threads: int | None = None, write_outputs: bool = True, fence=None,
        quiet: bool = False) -> Result:
    """Train `cfg` on this worker's `data` with peers reachable through `comm`.

    `write_outputs=False` leaves model.pt and summary.json to the caller (the Spark driver);
    `fence`, if given, is asked before each write whether this run still owns --out;
    `quiet` prints nothing (the Spark driver shows progress from metrics.jsonl instead)."""
    started = time.perf_counter()
    config.check_world(cfg, comm.world_size)
    device = resolve_device(cfg.device, local_rank)
    torch.manual_seed(cfg.seed)
    model = models.build(cfg, data.sample_shape, data.outputs).to(device)
    bf16 = cfg.train.precision == "bf16"
    grads = FusedGrads(model, comm, grads_in_place=not bf16)  # autocast: autograd's own path
    optimizer = make_optimizer(cfg, model)
    writer = RunWriter(out_dir, active=comm.rank == 0, fence=fence, stream=None if quiet else sys.stdout,
                       tensorboard=cfg.log.tensorboard)

    pos = Position()
    ckpt = checkpoint.latest(writer.checkpoint_dir, warn=writer.log) if resume and out_dir else None
    if ckpt is not None:
        pos = _restore(ckpt, model, optimizer, cfg, comm.world_size)
    _agree_on_start(comm, pos.step, device)
    broadcast_parameters(comm, model)  # dist: every worker starts from rank 0's weights
    optimizer = hoststep.share(comm, grads, optimizer, cfg.comm.shard_optimizer,  # dist: one host steps in parts
                               min_bytes=cfg.comm.shard_optimizer_min_mb * 2**20)
    writer.start_metrics(pos.step if ckpt is not None else None)
    writer.log(f"[dist-train] {launcher}: world {comm.world_size}, device {device}, "
               f"threads {threads or torch.get_num_threads()}, {data.n} rows, "
               f"{sum(p.numel() for p in model.parameters())} parameters"
               + (f", resumed at step {pos.step} (epoch {pos.epoch})" if ckpt is not None else ""))

    t = cfg.train
    timing = dict.fromkeys(TIMES, 0.0)  # this worker's seconds, by kind
    last_times = (0.0,) * len(TIMES)  # this worker's previous step, sent along with the next one's gradients
    interval, interval_steps = [0.0] * len(TIMES), 0  # all workers' seconds since the last logged step
    all_workers = [0.0] * len(TIMES)  # all workers' seconds, summed
    steady = {"t0": None, "samples": 0}
    stopped_by = "epochs"
    last_log = (time.perf_counter(), pos.samples)
    loop_start = time.perf_counter()
    samples_at_start = pos.samples
    steps_run = 0  # in this process (a resumed run starts from 0 here)
    epoch_start = time.perf_counter()
    epoch_steps = sharding.steps_per_epoch(  # for the progress bar (rank 0 on a terminal) and cosine decay
        n=data.n, seed=cfg.seed, world=comm.world_size, batch_size=t.batch_size, accumulate=t.accumulate,
        eval_fraction=cfg.data.eval_fraction, sampling=cfg.data.sampling) \
        if writer.tty or t.schedule == "cosine" else 0
    total_steps = 0  # what a cosine schedule decays over
    if t.schedule == "cosine":
        total_steps = min(t.epochs * epoch_steps, t.max_steps or t.epochs * epoch_steps)
    skipped = 0  # steps skipped for a non-finite loss
    model.train()
    ahead = _Ahead(data, device)
    while pos.epoch < t.epochs and stopped_by == "epochs":
        batches = sharding.epoch_batches(
            n=data.n, seed=cfg.seed, epoch=pos.epoch, rank=comm.rank, world=comm.world_size,
            batch_size=t.batch_size, eval_fraction=cfg.data.eval_fraction, sampling=cfg.data.sampling,
            shuffle=t.shuffle)
        while True:
            if t.max_steps is not None and pos.step >= t.max_steps:
                stopped_by = "max_steps"  # also when resumed at the limit: no extra step
                break
            if pos.batch == 0:  # a new epoch's first step
                pos.epoch_loss, pos.epoch_count = 0.0, 0
                epoch_start = time.perf_counter()
            t0 = time.perf_counter()
            lr = schedule.lr_at(t, pos.step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            grads.zero()
            count, loss_sum, right, t_data = 0, 0.0, 0, 0.0
            logged = t.log_every and (pos.step + 1) % t.log_every == 0  # accuracy is only needed there
            micro = batches[pos.batch:pos.batch + t.accumulate]
            scale = grads.loss_scale(sum(len(rows) for rows in micro))
            # dist: a worker whose shard is used up still joins the step, with zeros
            for i, rows in enumerate(micro):  # micro-batches: gradients add up in place
                ta = time.perf_counter()
                xb, yb = ahead.take(rows) or data.batch(rows, device)
                t_data += time.perf_counter() - ta
                # (a disabled autocast still costs ~3 us to enter and leave, a nullcontext 0.3)
                with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                    out = model(xb)
                loss = losses.loss_sum(t.loss, out.float(), yb)
                (loss * scale if scale != 1.0 else loss).backward()
                count += len(rows)
                loss_sum = loss_sum + loss.detach() if i else loss.detach()  # one micro-batch: no tensor op
                if logged:
                    right = right + losses.correct(t.loss, out.detach(), yb)
            t1 = t0 + t_data
            t2 = time.perf_counter()
            comm.step = pos.step + 1  # names the step in a stall report
            waited = comm.waited_s()
            following = pos.batch + t.accumulate
            idle = ahead.arm(batches[following]) if following < len(batches) else None
            step_stats = grads.sync(comm, count, loss_sum, right, following < len(batches), last_times, idle)
            t3 = time.perf_counter()
            waited = comm.waited_s() - waited
            if step_stats.nonfinite:  # every worker sees the same flags: all act alike
                where = ", ".join(map(str, step_stats.nonfinite_ranks)) or f"{step_stats.nonfinite} workers"
                if not t.skip_nonfinite:
                    raise TrainingError(f"non-finite loss at step {pos.step + 1} on rank(s) {where} "
                                        f"(set train.skip_nonfinite: true to skip such steps)")
                writer.log(f"[dist-train] step {pos.step + 1}: non-finite loss on rank(s) {where}; step skipped")
                skipped += 1
            else:
                optimizer.step()
            t4 = time.perf_counter()
            last_times = (t1 - t0, (t2 - t1) + (t4 - t3), t3 - t2 - waited, waited)
            for i, kind in enumerate(TIMES):
                timing[kind] += last_times[i]
                interval[i] += step_stats.times[i]
                all_workers[i] += step_stats.times[i]
            interval_steps += 1 if steps_run else 0  # the first step carries no previous step's times
            pos.step += 1
            pos.batch += t.accumulate
            if not step_stats.nonfinite:
                pos.samples += step_stats.count
                pos.epoch_loss += step_stats.loss * step_stats.count
                pos.epoch_count += step_stats.count
            steps_run += 1
            if steps_run == STEADY_SKIP:
                steady["t0"], steady["samples"] = t4, pos.samples
            if not step_stats.more:
                pos.epoch, pos.batch = pos.epoch + 1, 0
            if cfg.comm.check_every_steps and pos.step % cfg.comm.check_every_steps == 0:
                _check_in_step(comm, model, pos.step)
            if t.target_loss is not None and step_stats.loss <= t.target_loss:
                stopped_by = "target_loss"  # same global loss on every worker: all stop together
            if t.log_every and pos.step % t.log_every == 0:
                last_log = _log_step(writer, pos, step_stats, cfg, last_log, loop_start, lr,
                                     [v / max(interval_steps * comm.world_size, 1) for v in interval])
                interval, interval_steps = [0.0] * len(TIMES), 0
            if writer.tty:
                done = pos.batch if pos.batch else epoch_steps * t.accumulate
                writer.progress(pos.epoch if pos.batch else pos.epoch - 1, -(-done // t.accumulate), epoch_steps,
                                step_stats.loss, (pos.samples - samples_at_start) / max(t4 - loop_start, 1e-9),
                                t4 - epoch_start)
            if cfg.checkpoint.every_steps and pos.step % cfg.checkpoint.every_steps == 0:
                writer.checkpoint(pos.step, _state(model, optimizer, pos, cfg, comm), cfg.checkpoint.keep)
            if pos.batch == 0:  # the epoch just ended
                _log_epoch(writer, pos)
                break
            if stopped_by != "epochs":
                break
    loop_end = time.perf_counter()
    train_seconds = loop_end - loop_start
    final_loss = pos.epoch_loss / pos.epoch_count if pos.epoch_count else None
    writer.checkpoint(pos.step, _state(model, optimizer, pos, cfg, comm), cfg.checkpoint.keep)
    evaluation = evaluate(cfg, comm, model, data, device)
    steady_sps = None
    if steady["t0"] is not None and loop_end > steady["t0"]:
        steady_sps = (pos.samples - steady["samples"]) / (loop_end - steady["t0"])
    summary = {
        "launcher": launcher,
        "world_size": comm.world_size,
        "steps": pos.step,
        "epochs": pos.epoch,
        "stopped_by": stopped_by,
        "skipped_nonfinite_steps": skipped,
        "final_train_loss": final_loss,
        "eval": evaluation,
        "samples": pos.samples,
        "samples_per_sec": (pos.samples - samples_at_start) / train_seconds if train_seconds > 0 else None,
        "steady_samples_per_sec": steady_sps,
        "wall_seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "seconds": timing,  # this worker's (rank 0's in the summary), over this process's steps
        # the mean over workers of the same (each worker's last step is not in it)
        "seconds_mean_over_workers": {k: v / comm.world_size for k, v in zip(TIMES, all_workers)},
        "steps_run": steps_run,
        "grad_bytes": grads.nbytes,
        "optimizer_parts": len(optimizer.cuts) - 1 if isinstance(optimizer, hoststep.HostStep) else 1,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # this worker's (Linux: KiB)
        "device": str(device),
        "threads": threads or torch.get_num_threads(),
        "meta": {"sample_shape": list(data.sample_shape), "outputs": data.outputs, "loss": t.loss,
                 "model": cfg.model.target or cfg.model.name, "torch": str(torch.__version__),
                 "launcher": launcher, "world_size": comm.world_size, "steps": pos.step},
    }
    writer.close()
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    result = Result(state_dict, summary, model)
    if write_outputs and writer.active:
        write_final(writer.out, result.model_payload(cfg), summary)
    writer.log(f"[dist-train] done: {pos.step} steps, {pos.epoch} epochs ({stopped_by}), "
               f"train loss {_fmt(final_loss)}, eval loss {_fmt(evaluation['loss'])}"
               + (f", eval accuracy {evaluation['accuracy']:.4f}" if evaluation.get("accuracy") is not None else "")
               + (f", {summary['samples_per_sec']:.0f} samples/s" if summary["samples_per_sec"] else ""))
    return result


def evaluate(cfg, comm, model, data: WorkerData, device, batch_size: int = 1024) -> dict:
    """Loss and accuracy over the held-out rows, each scored once by the worker that holds it."""
    rows = sharding.eval_rows(data.n, cfg.seed, cfg.data.eval_fraction, comm.rank, comm.world_size)
    totals = torch.zeros(3, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            xb, yb = data.batch(rows[i:i + batch_size], device)
            out = model(xb)
            totals[0] += len(xb)
            totals[1] += float(losses.loss_sum(cfg.train.loss, out, yb))
            totals[2] += float(losses.correct(cfg.train.loss, out, yb))
    model.train()
    comm.allreduce(totals)  # dist: sum over workers; every worker returns the same numbers
    count, loss, right = totals.tolist()
    split = "held_out" if cfg.data.eval_fraction > 0 else "train"
    result = {"split": split, "samples": int(count), "loss": loss / count if count else None}
    if cfg.train.loss != "mse":
        result["accuracy"] = right / count if count else None
    return result


def _log_step(writer, pos: Position, s, cfg, last_log, t_start, lr, step_times):
    """A metrics line; `step_times`: mean seconds per step and worker since the last line (TIMES)."""
    now = time.perf_counter()
    rate = (pos.samples - last_log[1]) / max(now - last_log[0], 1e-9)
    rec = {"kind": "step", "step": pos.step, "epoch": pos.epoch if pos.batch else pos.epoch - 1,
           "loss": s.loss, "samples": pos.samples, "samples_per_sec": rate, "lr": lr,
           "time": now - t_start}
    rec.update({f"{kind}_ms": 1000 * v for kind, v in zip(TIMES, step_times)})
    if cfg.train.loss != "mse":
        rec["accuracy"] = s.correct / s.count if s.count else None
    writer.metric(rec)
    if not writer.tty:  # a terminal shows the progress bar instead
        writer.log(f"step {pos.step:>6}  epoch {rec['epoch']:>3}  loss {s.loss:.5f}  {rate:,.0f} samples/s")
    return now, pos.samples


def _log_epoch(writer, pos: Position):
    loss = pos.epoch_loss / pos.epoch_count if pos.epoch_count else None
    writer.metric({"kind": "epoch", "step": pos.step, "epoch": pos.epoch - 1, "loss": loss,
                   "samples": pos.samples})


def _state(model, optimizer, pos: Position, cfg, comm) -> dict:
    return {
        "format": 1,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "position": vars(pos).copy(),
        "rng": torch.get_rng_state(),
        "config": config.to_dict(cfg),
        "world_size": comm.world_size,
    }


def _restore(ckpt: dict, model, optimizer, cfg, world_size: int) -> Position:
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (KeyError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"the checkpoint does not fit this model/optimizer: {first}") from None
    old, new = dict(config.flat_items(ckpt.get("config", {}))), dict(config.flat_items(config.to_dict(cfg)))
    for key in ("seed", "data.name", "data.path", "data.size", "data.sampling", "data.eval_fraction",
                "train.batch_size", "train.shuffle", "train.accumulate"):
        a, b = old.get(key), new.get(key)
        if a != b:
            raise UserError(f"--resume: the checkpoint was trained with {key}={a!r}, this run has {b!r}")
    if ckpt.get("world_size") != world_size and cfg.data.sampling == "shard":
        raise UserError(f"--resume: the checkpoint was trained by {ckpt.get('world_size')} workers with "
                        f"data.sampling shard; resume with the same world size or use global sampling")
    torch.set_rng_state(ckpt["rng"])
    return Position(**ckpt["position"])


def _check_in_step(comm, model, step: int) -> None:
    """Stop every worker if their parameters drifted apart (invariant 5)."""
    if comm.world_size == 1:
        return
    sums = parameter_checksums(comm, model)
    off = [r for r, v in enumerate(sums) if v != sums[0]]
    if off:
        raise TrainingError(f"parameters differ across workers at step {step}: rank(s) {', '.join(map(str, off))} "
                            f"differ from rank 0 (checksums {[sums[0]] + [sums[r] for r in off]})")


def _agree_on_start(comm, step: int, device) -> None:
    """All workers must resume from the same step (a checkpoint dir not shared would differ)."""
    if comm.world_size == 1:
        return
    mine = torch.tensor([float(step)], dtype=torch.float64)
    root = mine.clone()
    comm.broadcast(root)  # dist: compare with rank 0's starting step
    differs = torch.tensor([float(root.item() != mine.item())], dtype=torch.float64)
    comm.allreduce(differs)
    if differs.item():
        raise UserError(f"workers would start at different steps (rank 0: {int(root.item())}, rank {comm.rank}: "
                        f"{step}): is the --out directory shared by every worker?")


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.5f}"
