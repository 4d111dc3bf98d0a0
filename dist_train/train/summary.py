"""What a run reports: summary.json, the metrics lines and the last line."""

from __future__ import annotations

import math
import resource
import time

import torch

from ..data.items import jsonable
from .gradsync import TIMES


def summary(run, evaluation: dict, wall_seconds: float) -> dict:
    pos, clock = run.pos, run.clock
    train_seconds = clock.end - clock.start
    return {
        "launcher": run.launcher,
        "world_size": run.comm.world_size,
        "steps": pos.step,
        "epochs": pos.epoch,
        "stopped_by": run.stopped_by,
        "skipped_nonfinite_steps": run.step.skipped,
        "skipped_overflow_steps": run.scaler.overflows if run.scaler is not None else 0,  # fp16
        "loss_scale": run.scaler.scale if run.scaler is not None else None,
        "final_train_loss": pos.epoch_loss / pos.epoch_count if pos.epoch_count else None,
        "eval": evaluation,
        "samples": pos.samples,
        "samples_per_sec": (pos.samples - clock.samples_at_start) / train_seconds if train_seconds > 0 else None,
        "steady_samples_per_sec": clock.steady_rate(pos.samples),
        "wall_seconds": wall_seconds,
        "train_seconds": train_seconds,
        "seconds": clock.mine,  # this worker's (rank 0's in the summary), over this process's steps
        "seconds_mean_over_workers": {k: v / run.comm.world_size for k, v in zip(TIMES, clock.all)},
        "steps_run": clock.steps_run,
        "grad_bytes": run.grads.nbytes,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # this worker's (Linux: KiB)
        "device": str(run.device),
        "device_reason": run.choice.why if run.choice is not None else "",  # how device.choose picked it
        "devices": run.devices,  # every worker's, where one is on a GPU
        "threads": run.threads or torch.get_num_threads(),
        "meta": {"sample_shape": jsonable(run.data.sample_shape), "outputs": run.data.outputs, "loss": run.loss.name,
                 "model": model_name(run), "torch": str(torch.__version__),
                 "launcher": run.launcher, "world_size": run.comm.world_size, "steps": pos.step},
    }


def step_record(run, stats, lr: float) -> dict:
    """A metrics line for the step just taken, with the mean times per step and worker since the last."""
    pos = run.pos
    rate, now = run.clock.rate_since_log(pos.samples)
    rec = {"kind": "step", "step": pos.step, "epoch": pos.epoch if pos.batch else pos.epoch - 1,
           "loss": stats.loss, "samples": pos.samples, "samples_per_sec": rate, "lr": lr,
           "time": now - run.clock.start, "wall": time.time() - run.job_started}
    rec.update({f"{kind}_ms": 1000 * v for kind, v in zip(TIMES, run.clock.interval_means())})
    for metric, (total, count) in zip(run.metrics, stats.metrics):
        rec[metric.name] = total / count if count else None
    return rec


def model_name(run) -> str:
    """What built the model: a built-in's name, model.target, or `object` (given to fit)."""
    if run.given_model is not None:
        return "object"
    return run.cfg.model.target or run.cfg.model.name


def eval_record(run, result: dict) -> dict:
    """A metrics line for a held-out evaluation (its loss and metrics) after the step just taken."""
    pos = run.pos
    return {"kind": "eval", "step": pos.step, "epoch": pos.epoch if pos.batch else pos.epoch - 1,
            **{k: v for k, v in result.items() if k != "split"}, "time": time.perf_counter() - run.clock.start,
            "wall": time.time() - run.job_started}


def epoch_record(pos) -> dict:
    loss = pos.epoch_loss / pos.epoch_count if pos.epoch_count else None
    return {"kind": "epoch", "step": pos.step, "epoch": pos.epoch - 1, "loss": loss, "samples": pos.samples}


def done_line(s: dict) -> str:
    return (f"[dist-train] done: {count(s['steps'], 'step')}, {count(s['epochs'], 'epoch')} ({s['stopped_by']}), "
            f"train loss {_fmt(s['final_train_loss'])}, {eval_text(s['eval'])}"
            + (f", {s['samples_per_sec']:.0f} samples/s" if s["samples_per_sec"] else ""))


def count(n: int, word: str) -> str:
    """'1 epoch', '2 epochs'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def eval_text(ev: dict) -> str:
    """The evaluation as words: 'eval loss 0.09777, eval accuracy 0.9752' (not a Python dict)."""
    return ", ".join([f"eval loss {_fmt(ev.get('loss'))}"] + [
        f"eval {k} {v:.4f}" for k, v in ev.items() if k not in ("split", "samples", "loss") and isinstance(v, float)])


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.5f}"
