"""MLflow tracking (`log.mlflow: true`): exactly one run per job, whatever the launcher.

Only rank 0 tracks (a RunWriter built for another rank holds no Tracker), so a job of N
workers is one run, not N (mlflow #11782). The run gets the flat config as params, every
logged step's and epoch's numbers as metrics, the summary (and its eval numbers as
metrics), and model.pt as an artifact. Its id travels in each checkpoint, so `--resume`
(and a Spark retry) continues the same run. The tracking URI is `log.mlflow_uri`, else
MLFLOW_TRACKING_URI, else MLflow's default; the experiment is `log.mlflow_experiment`.
MLflow's client API is used with explicit run ids: a run the user's own script has open
is left alone.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from .. import config

SKIPPED = ("kind", "step", "epoch", "time", "wall")  # a metrics line's fields that are its coordinates, not numbers to track


class Tracker:
    def __init__(self, cfg, run_id: str | None = None, launcher: str = "local", world: int = 1):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=cfg.log.mlflow_uri or None)
        if run_id is None:
            name = cfg.log.mlflow_experiment
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found is not None else self.client.create_experiment(name)
            run = self.client.create_run(experiment, tags={"dist_train.launcher": launcher,
                                                           "dist_train.world_size": str(world)})
            run_id = run.info.run_id
            params = [Param(k, _text(v)) for k, v in config.flat_items(config.to_dict(cfg))]
            for at in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                self.client.log_batch(run_id, params=params[at:at + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def metrics(self, record: dict) -> None:
        """A metrics.jsonl record: its numbers at its step (epoch lines as epoch_<name>, the
        held-out ones as eval_<name>)."""
        from mlflow.entities import Metric

        prefix = {"epoch": "epoch_", "eval": "eval_"}.get(record["kind"], "")
        now = int(time.time() * 1000)
        batch = [Metric(prefix + k, float(v), now, record["step"]) for k, v in record.items()
                 if k not in SKIPPED and isinstance(v, (int, float)) and not isinstance(v, bool)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def finish(self, summary: dict, model_payload: dict) -> None:
        """The summary (and its eval numbers, as eval_<name> metrics) and model.pt; the run ends."""
        from mlflow.entities import Metric

        from .checkpoint import atomic_save

        now, step = int(time.time() * 1000), summary.get("steps", 0)
        evals = [Metric(f"eval_{k}", float(v), now, step) for k, v in summary.get("eval", {}).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if evals:
            self.client.log_batch(self.run_id, metrics=evals)
        self.client.log_dict(self.run_id, summary, "summary.json")
        with tempfile.TemporaryDirectory(prefix="dist-train-mlflow-") as tmp:
            path = Path(tmp) / "model.pt"
            atomic_save(path, model_payload)
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FINISHED")

    def failed(self, status: str = "FAILED") -> None:
        """The run ended without finishing: FAILED, or KILLED (stopped by a signal, to resume)."""
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception:  # noqa: BLE001 - the job is failing already: its own error is the one to tell
            pass


def _text(v) -> str:
    return str(v)[:6000]  # MLflow's limit for a param value


def resolve_uri(cfg) -> None:
    """Fix the tracking URI where the job starts (the Spark driver), so that rank 0 on an
    executor, whose environment is not the driver's, logs to the same place."""
    if cfg.log.mlflow and not cfg.log.mlflow_uri:
        import mlflow

        cfg.log["mlflow_uri"] = os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
