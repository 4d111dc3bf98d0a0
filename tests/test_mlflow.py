"""MLflow tracking, really run: `mpirun -n 2` with log.mlflow makes one run (rank 0's),
with the config as params, the logged steps as metrics, the summary and model.pt; a
--resume continues that run. The Spark job's run is tested in test_spark_ml.py."""

import json

import pytest

from .helpers import mpirun, ok

SMALL = ["train.epochs=2", "model.hidden=[16]", "train.log_every=5", "log.mlflow=true"]


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    return f"file:{tmp_path / 'mlruns'}"


def runs(uri: str, experiment: str = "dist-train"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    return client, client.search_runs([found.experiment_id]) if found else []


def check_one_run(uri: str, out) -> object:
    client, found = runs(uri)
    assert len(found) == 1, [r.info.run_id for r in found]
    run = found[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] in ("2", "4") and run.data.params["model.hidden"] == "[16]"
    assert run.data.tags["dist_train.world_size"] == "2"
    summary = json.loads((out / "summary.json").read_text())
    assert run.data.metrics["eval_accuracy"] == pytest.approx(summary["eval"]["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.pt", "summary.json"} <= artifacts
    return client, run


def test_mpirun_makes_one_run_and_a_resume_continues_it(store, tmp_path):
    out = tmp_path / "out"
    ok(mpirun(2, "conf/digits.yaml", out, *SMALL, f"log.mlflow_uri={store}"))
    client, run = check_one_run(store, out)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [r["step"] for r in logged if r["kind"] == "step"] and len(steps) >= 4
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch_loss")] == \
        [r["step"] for r in logged if r["kind"] == "epoch"]

    ok(mpirun(2, "conf/digits.yaml", out, *SMALL, f"log.mlflow_uri={store}", "train.epochs=4", resume=True))
    client, again = check_one_run(store, out)
    assert again.info.run_id == run.info.run_id
    more = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert more == [r["step"] for r in logged if r["kind"] == "step"] and more[:len(steps)] == steps
    assert max(more) > max(steps)
    assert again.data.params["train.epochs"] == "2"  # params are the run's first config; MLflow keeps them


def test_the_tracking_uri_comes_from_the_environment(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    ok(mpirun(2, "conf/digits.yaml", tmp_path / "out", *SMALL, "log.mlflow_experiment=digits"))
    _, found = runs(store, "digits")
    assert len(found) == 1 and found[0].info.status == "FINISHED"
