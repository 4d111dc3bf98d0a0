"""`dist-train plot RUN_DIR [RUN_DIR...] --out runs.png`: loss and accuracy against steps
and against wall time from the job's start (mpirun's or Spark's start-up included), for
training (solid) and the held-out rows (dashed, scored every train.eval_every steps),
several runs overlaid (local vs MPI vs Spark of one config), and where each run's step
time went (compute, communication, waiting for slower workers, data), averaged over its
workers, from its summary.json. A run still going is plotted as far as it got."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError


def _read(run: Path) -> tuple[list[dict], list[dict], dict | None]:
    """(step lines, held-out lines, the summary or None while the run goes on)."""
    metrics, summary = run / "metrics.jsonl", run / "summary.json"
    if not metrics.exists():
        raise UserError(f"{run} is not a run (no metrics.jsonl)")
    rows = []
    for line in metrics.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a kill, or being written
    done = json.loads(summary.read_text()) if summary.exists() else None
    return [r for r in rows if r.get("kind") == "step"], [r for r in rows if r.get("kind") == "eval"], done


def _seconds(r: dict) -> float:
    return r.get("wall", r.get("time", 0.0))  # runs from before the wall clock: seconds of training


def plot_runs(runs: list[str | Path], out: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'dist-train[plot]'") from None
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    (loss_step, loss_time, bars), (acc_step, acc_time, blank) = axes
    blank.axis("off")
    names, parts = [], {k: [] for k in ("compute", "optimizer", "comm", "wait", "data", "other")}
    for run in map(Path, runs):
        steps, held, summary = _read(run)
        label = f"{run.name} ({summary['launcher']}, {summary['world_size']})" if summary else f"{run.name} (running)"
        color = None  # one colour per run: its training and held-out curves
        for rows, style, suffix in ((steps, "-", ""), (held, "--", ", held out")):
            if not rows:
                continue
            x_step, x_time = [r["step"] for r in rows], [_seconds(r) for r in rows]
            line, = loss_step.plot(x_step, [r["loss"] for r in rows], style, label=label + suffix, color=color)
            color = line.get_color()
            loss_time.plot(x_time, [r["loss"] for r in rows], style, label=label + suffix, color=color)
            if any(r.get("accuracy") is not None for r in rows):
                acc_step.plot(x_step, [r.get("accuracy") for r in rows], style, label=label + suffix, color=color)
                acc_time.plot(x_time, [r.get("accuracy") for r in rows], style, label=label + suffix, color=color)
        if summary:
            names.append(label)
            _time_parts(summary, parts)
    for ax, title, xlabel in ((loss_step, "loss", "step"), (loss_time, "loss", "seconds from the job's start"),
                              (acc_step, "accuracy", "step"), (acc_time, "accuracy", "seconds from the job's start")):
        ax.set_title(f"{title} (solid: training, dashed: held out)")
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=7)
    left = [0.0] * len(names)
    for k, values in parts.items():
        bars.barh(names, values, left=left, label=k)
        left = [a + b for a, b in zip(left, values)]
    bars.set_title("ms per step (mean over workers)")
    bars.legend(fontsize=7)
    bars.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _time_parts(summary: dict, parts: dict) -> None:
    seconds = summary.get("seconds_mean_over_workers", summary.get("seconds", {}))
    steps_timed = summary.get("steps_run", summary.get("steps", 1)) - ("seconds_mean_over_workers" in summary)
    for k in parts:  # the mean over workers leaves out each worker's last step
        parts[k].append(seconds.get(k, 0.0) / max(steps_timed, 1) * 1000)
