"""`dist-train plot RUN_DIR [RUN_DIR...] --out runs.png`: loss and accuracy against steps
and wall time, several runs overlaid (local vs MPI vs Spark of one config), and where each
run's step time went (compute, communication, waiting for slower workers, data), averaged
over its workers, from its summary.json."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError


def _read(run: Path) -> tuple[list[dict], dict]:
    metrics, summary = run / "metrics.jsonl", run / "summary.json"
    if not metrics.exists() or not summary.exists():
        raise UserError(f"{run} is not a finished run (needs metrics.jsonl and summary.json)")
    rows = []
    for line in metrics.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a kill
    return [r for r in rows if r.get("kind") == "step"], json.loads(summary.read_text())


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
    names, parts = [], {"compute": [], "comm": [], "wait": [], "data": []}
    for run in map(Path, runs):
        steps, summary = _read(run)
        label = f"{run.name} ({summary['launcher']}, {summary['world_size']})"
        names.append(label)
        x_step = [r["step"] for r in steps]
        x_time = [r.get("time", 0.0) for r in steps]
        loss_step.plot(x_step, [r["loss"] for r in steps], label=label)
        loss_time.plot(x_time, [r["loss"] for r in steps], label=label)
        if any(r.get("accuracy") is not None for r in steps):
            acc_step.plot(x_step, [r.get("accuracy") for r in steps], label=label)
            acc_time.plot(x_time, [r.get("accuracy") for r in steps], label=label)
        seconds = summary.get("seconds_mean_over_workers", summary.get("seconds", {}))
        steps_timed = summary.get("steps_run", summary.get("steps", 1)) - ("seconds_mean_over_workers" in summary)
        for k in parts:  # the mean over workers leaves out each worker's last step
            parts[k].append(seconds.get(k, 0.0) / max(steps_timed, 1) * 1000)
    for ax, title, xlabel in ((loss_step, "training loss", "step"), (loss_time, "training loss", "seconds"),
                              (acc_step, "training accuracy", "step"), (acc_time, "training accuracy", "seconds")):
        ax.set_title(title)
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
