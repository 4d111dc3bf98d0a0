"""Bring your own code, really run: the user's dataset (random crops, drawn per item),
model, loss, metrics and optimizer under local mode, mpirun and torchrun, and a user's
script calling dist_train.fit. (Spark with the same dataset: test_spark.py.)"""

import json
import sys

import pytest
import torch

from .helpers import BIN, ROOT, assert_same_weights, local, mpirun, mpirun_cmd, ok, run, weights
from .test_torchrun import free_port

BYO = "examples/byo.yaml"
SHORT = ["train.epochs=2", "threads=1", "train.log_every=0"]


def summary(out):
    return json.loads((out / "summary.json").read_text())


def test_crops_with_data_workers_learn_the_digits_and_a_resume_mid_epoch_is_bit_identical(tmp_path):
    """The whole example: held-out accuracy >= 0.95; cut at step 100 (mid-epoch 5) with two
    data processes, then --resume: the same bits as the run never cut."""
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    ok(local(BYO, straight, "threads=1"))
    s = summary(straight)
    assert s["eval"]["accuracy"] >= 0.95 and s["eval"]["top5"] > 0.99, s["eval"]
    ok(local(BYO, cut, "threads=1", "train.max_steps=100"))
    assert summary(cut)["steps"] == 100 and 100 % 23 != 0  # 23 steps an epoch: the cut is mid-epoch
    ok(local(BYO, cut, "threads=1", resume=True))
    a, b = weights(straight), weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mpi_with_global_sampling_trains_what_local_mode_trains(tmp_path):
    sets = [*SHORT, "data.sampling=global"]
    ok(local(BYO, tmp_path / "local", *sets))
    ok(mpirun(2, BYO, tmp_path / "mpi", *sets))
    assert_same_weights(tmp_path / "local", tmp_path / "mpi")
    assert summary(tmp_path / "mpi")["world_size"] == 2


@pytest.mark.parametrize("sets", [
    ["model.target=byo:bn_mlp", "model.kwargs={hidden: 32}"],  # BatchNorm + Dropout, label smoothing, AdamW, top5
    ["data.target=byo:TwoViews", "data.kwargs={}", "model.target=byo:TwoTower", "model.kwargs={}",
     "data.workers=0", "train.optimizer=sgd", "train.lr=0.1", "train.optimizer_kwargs={nesterov: true}",
     "train.momentum=0.9", "train.metrics=[accuracy, mae]", "train.loss=cross_entropy"],  # a dict of two inputs
], ids=["batchnorm-mlp", "two-inputs"])
def test_each_kind_of_user_code_trains_under_local_and_mpirun(tmp_path, sets):
    for name, launch in (("local", local), ("mpi", lambda *a: mpirun(2, *a))):
        ok(launch(BYO, tmp_path / name, "train.epochs=4", "threads=1", *sets))
        ev = summary(tmp_path / name)["eval"]
        assert ev["accuracy"] > 0.6, (name, ev)  # it learns (chance: 0.1)
        assert ("top5" in ev) == ("model.target=byo:bn_mlp" in sets) and ("mae" in ev) != ("top5" in ev)
    lines = [json.loads(x) for x in (tmp_path / "mpi" / "metrics.jsonl").read_text().splitlines()]
    assert all("accuracy" in x for x in lines if x["kind"] == "step")
    if "model.target=byo:bn_mlp" in sets:  # the saved statistics are those both workers hold: the run's own
        state = torch.load(tmp_path / "mpi" / "model.pt", weights_only=True)["state_dict"]
        assert state["2.running_var"].min() > 0 and not torch.equal(state["2.running_mean"], torch.zeros(32))


def script(*args):
    return [ROOT / "examples/byo_train.py", *args, *SHORT]


def test_one_script_runs_under_python_mpirun_and_torchrun_and_matches_dist_train_mpi(tmp_path):
    p = ok(run([sys.executable, *script(tmp_path / "python")], timeout=180))
    assert "eval accuracy" in p.stdout and summary(tmp_path / "python")["world_size"] == 1
    ok(run(mpirun_cmd(2, [sys.executable, *script(tmp_path / "mpirun")]), timeout=180))
    ok(run([BIN / "torchrun", "--nproc-per-node", 2, "--master-port", free_port(), *script(tmp_path / "torchrun")],
           timeout=180))
    ok(run([BIN / "dist-train", "mpi", "-n", 2, BYO, "--out", tmp_path / "cli",
            *[a for s in SHORT for a in ("--set", s)]], timeout=180))
    assert_same_weights(tmp_path / "mpirun", tmp_path / "torchrun")
    assert_same_weights(tmp_path / "mpirun", tmp_path / "cli")
    assert summary(tmp_path / "torchrun")["launcher"] == "torchrun" and summary(tmp_path / "mpirun")["launcher"] == "mpi"


def test_a_failing_item_on_one_rank_ends_the_job_with_its_row_named(tmp_path):
    p = mpirun(2, BYO, tmp_path / "o", *SHORT, "data.target=tests.faulty:BrokenCrops", "data.kwargs={fail_at: 1200}")
    assert p.returncode != 0 and "item 1200" in p.stderr and "row 1200 is broken" in p.stderr, p.stderr[-2000:]
    assert not list((tmp_path / "o").glob("model.pt"))
