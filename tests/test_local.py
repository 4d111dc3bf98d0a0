"""Local mode end to end: built-in configs learn, resume is exact, writes are atomic."""

import json
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch

from dist_train import config, data
from dist_train.comm import LocalComm
from dist_train.data import WorkerData
from dist_train.launchers import local
from dist_train.train import checkpoint, fit

from .helpers import ROOT, local as run_local, ok, weights


def train(tmp_path, conf, *sets, name="run", resume=False):
    out = tmp_path / name
    argv = [str(ROOT / conf), "--out", str(out)] + [a for s in sets for a in ("--set", s)]
    assert local.main(argv + (["--resume"] if resume else [])) == 0
    return out


def summary(out):
    return json.loads((out / "summary.json").read_text())


def test_xor_reaches_full_accuracy(tmp_path):
    s = summary(train(tmp_path, "conf/xor.yaml"))
    assert s["eval"]["accuracy"] == 1.0 and s["eval"]["samples"] == 4


def test_perceptron_learns_the_decision_rule(tmp_path):
    s = summary(train(tmp_path, "conf/perceptron.yaml"))
    assert s["eval"]["accuracy"] == 1.0 and s["eval"]["samples"] == 8


def test_digits_reaches_its_target_and_writes_every_output(tmp_path):
    out = train(tmp_path, "conf/digits.yaml")
    s = summary(out)
    assert s["eval"]["accuracy"] >= 0.96
    assert s["eval"]["split"] == "held_out" and 300 < s["eval"]["samples"] < 420
    for key in ("launcher", "world_size", "steps", "epochs", "final_train_loss", "samples_per_sec", "wall_seconds"):
        assert s[key] is not None, key
    model = torch.load(out / "model.pt", weights_only=True)
    assert set(model) == {"state_dict", "config", "meta"} and model["config"]["data"]["name"] == "digits"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if r["kind"] == "epoch"] == list(range(30))
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert checkpoint.listing(out / "checkpoints")


@pytest.mark.parametrize("sets", [[], ["checkpoint.every_steps=7"]])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, sets):
    base = ["train.epochs=4", "model.hidden=[32]", *sets]
    straight = train(tmp_path, "conf/digits.yaml", *base, name="straight")
    half = train(tmp_path, "conf/digits.yaml", *base[1:], "train.epochs=2", name="resumed")
    train(tmp_path, "conf/digits.yaml", *base, name="resumed", resume=True)
    for k, v in weights(straight).items():
        assert torch.equal(v, weights(half)[k]), k
    assert summary(half)["steps"] == summary(straight)["steps"]


def test_resume_mid_epoch_from_a_periodic_checkpoint(tmp_path):
    base = ["train.epochs=3", "model.hidden=[32]", "checkpoint.every_steps=5", "train.momentum=0.5"]
    straight = train(tmp_path, "conf/digits.yaml", *base, name="straight")
    cut = train(tmp_path, "conf/digits.yaml", *base, "train.max_steps=33", name="cut")
    assert summary(cut)["steps"] == 33
    train(tmp_path, "conf/digits.yaml", *base, name="cut", resume=True)
    for k, v in weights(straight).items():
        assert torch.equal(v, weights(cut)[k]), k
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps), "metrics after resume continue, not repeat"


def test_early_stop_on_target_loss(tmp_path):
    s = summary(train(tmp_path, "conf/xor.yaml", "train.target_loss=0.3"))
    assert s["stopped_by"] == "target_loss" and s["steps"] < 400


def test_killed_checkpoint_write_leaves_the_previous_one(tmp_path):
    d = tmp_path / "ckpt"
    code = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
from dist_train.train import checkpoint
checkpoint.save({str(d)!r}, 1, {{"step": 1}}, keep=3)
os.fsync = lambda fd: os._exit(9)   # die in the middle of the next write
checkpoint.save({str(d)!r}, 2, {{"step": 2}}, keep=3)
"""
    p = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert p.returncode == 9
    assert [c.name for c in checkpoint.listing(d)] == ["step-00000001.pt"]
    assert checkpoint.latest(d)["step"] == 1


def test_corrupt_or_truncated_checkpoint_falls_back_to_the_previous(tmp_path):
    d = tmp_path / "ckpt"
    checkpoint.save(d, 1, {"step": 1, "w": torch.ones(100)}, keep=3)
    path = checkpoint.save(d, 2, {"step": 2, "w": torch.ones(100)}, keep=3)
    path.write_bytes(path.read_bytes()[:50])
    warnings = []
    assert checkpoint.latest(d, warn=warnings.append)["step"] == 1
    assert "corrupt or truncated" in warnings[0]
    checkpoint.save(d, 3, {"step": 3}, keep=2)
    assert [c.name for c in checkpoint.listing(d)] == ["step-00000002.pt", "step-00000003.pt"]


def test_npz_members_are_memory_mapped(tmp_path):
    x = np.random.default_rng(0).standard_normal((50, 1, 4, 4)).astype(np.float32)
    y = np.arange(50) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = data.load_npz(tmp_path / "d.npz")
    assert isinstance(ds.x, np.memmap) and np.array_equal(ds.x, x) and np.array_equal(ds.y, y)
    np.savez_compressed(tmp_path / "c.npz", x=x, y=y)
    assert np.array_equal(data.load_npz(tmp_path / "c.npz").x, x)


def test_parquet_with_feature_columns_or_a_list_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.random.default_rng(0).standard_normal((20, 3)).astype(np.float32)
    y = np.arange(20) % 2
    pq.write_table(pa.table({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "label": y}), tmp_path / "cols.parquet")
    pq.write_table(pa.table({"features": list(x), "label": y}), tmp_path / "list.parquet")
    for name in ("cols", "list"):
        ds = data.load_parquet(tmp_path / f"{name}.parquet", "label")
        assert np.array_equal(ds.x, x) and np.array_equal(ds.y, y)


def test_fit_python_api_returns_the_model():
    cfg = config.load(ROOT / "conf/xor.yaml", ["train.epochs=50"])
    ds = data.xor()
    result = fit(cfg, LocalComm(), WorkerData.whole(ds, 2))
    assert result.summary["steps"] == 50
    out = result.model(torch.from_numpy(ds.x))
    assert out.shape == (4, 2)


def test_resume_at_the_step_limit_takes_no_extra_step(tmp_path):
    cut = train(tmp_path, "conf/digits.yaml", "train.epochs=3", "model.hidden=[32]", "train.max_steps=10", name="cut")
    before = weights(cut)
    train(tmp_path, "conf/digits.yaml", "train.epochs=3", "model.hidden=[32]", "train.max_steps=10", name="cut",
          resume=True)
    assert summary(cut)["steps"] == 10 and summary(cut)["stopped_by"] == "max_steps"
    assert all(torch.equal(v, weights(cut)[k]) for k, v in before.items())


def test_tensorboard_scalars_match_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    ok(run_local("conf/xor.yaml", out, "train.epochs=60", "train.log_every=20", "log.tensorboard=true"))
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in steps if r["kind"] == "step"]
    got = board.Scalars("step/loss")
    assert [e.step for e in got] == [r["step"] for r in logged]
    assert [e.value for e in got] == pytest.approx([r["loss"] for r in logged], rel=1e-6)
    assert {"step/lr", "step/accuracy", "step/compute_ms", "step/comm_ms", "epoch/loss"} <= set(board.Tags()["scalars"])


def test_resume_never_starts_a_fresh_run_silently(tmp_path):
    """--resume where there is nothing to continue from is one line and exit 2, not a new run."""
    missing = tmp_path / "missing"
    p = run_local("conf/xor.yaml", missing, resume=True)
    assert p.returncode == 2 and "--resume:" in p.stderr and "does not exist" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    p = run_local("conf/xor.yaml", empty, resume=True)
    assert p.returncode == 2 and "holds no run" in p.stderr and not any(empty.iterdir()), p.stderr
    out = tmp_path / "run"
    ok(run_local("conf/xor.yaml", out, "train.epochs=20", "checkpoint.every_steps=5"))
    (out / "summary.json").unlink()
    for path in checkpoint.listing(out / "checkpoints"):
        path.write_bytes(path.read_bytes()[:40])  # every checkpoint torn
    p = run_local("conf/xor.yaml", out, "train.epochs=40", resume=True)
    assert p.returncode == 2 and "every checkpoint in" in p.stderr and "is corrupt" in p.stderr, p.stderr
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("spoil", ["no rng", "rng a list", "position a string", "batch past the data",
                                   "not a dict", "negative step"])
def test_a_checkpoint_whose_content_is_malformed_counts_as_corrupt(spoil, tmp_path):
    """Its checksum is valid (rewritten), its content is not a checkpoint: the previous one is used."""
    out = tmp_path / "run"
    ok(run_local("conf/xor.yaml", out, "train.epochs=20", "checkpoint.every_steps=5", "train.log_every=0"))
    newest = checkpoint.listing(out / "checkpoints")[-1]
    state = torch.load(newest, weights_only=False)
    if spoil == "no rng":
        del state["rng"]
    elif spoil == "rng a list":
        state["rng"] = [1, 2, 3]
    elif spoil == "position a string":
        state["position"] = "step 3"
    elif spoil == "batch past the data":
        state["position"]["batch"] = 10 ** 6
    elif spoil == "not a dict":
        state = [state]
    else:
        state["position"]["step"] = -1
    checkpoint.save(out / "checkpoints", int(newest.stem.split("-")[1]), state, keep=3)  # a valid checksum
    p = ok(run_local("conf/xor.yaml", out, "train.epochs=25", "checkpoint.every_steps=5", "train.log_every=0",
                     resume=True))
    assert f"checkpoint {newest} is malformed" in p.stdout + p.stderr and "trying the previous checkpoint" \
        in p.stdout + p.stderr
    assert "Traceback" not in p.stderr


def test_resume_refuses_data_that_changed_and_a_run_already_past_its_end(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 4)).astype("float32"), rng.integers(0, 3, 200)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    sets = ["data.name=npz", f"data.path={tmp_path / 'd.npz'}", "model.hidden=[8]", "train.log_every=0",
            "train.batch_size=32"]
    out = tmp_path / "run"
    ok(run_local("conf/digits.yaml", out, *sets, "train.epochs=3"))
    p = run_local("conf/digits.yaml", out, *sets, "train.epochs=2", resume=True)
    assert p.returncode == 2 and p.stderr.strip() == (
        "error: --resume: the checkpoint (step 15) has trained 3 epochs, past train.epochs=2: nothing to train; "
        "raise train.epochs to continue"), p.stderr
    p = run_local("conf/digits.yaml", out, *sets, "train.epochs=9", "train.max_steps=10", resume=True)
    assert p.returncode == 2 and "past train.max_steps=10" in p.stderr
    np.savez(tmp_path / "d.npz", x=x[:150], y=y[:150])  # rows lost since
    p = run_local("conf/digits.yaml", out, *sets, "train.epochs=6", resume=True)
    assert p.returncode == 2 and "the data changed since the checkpoint: rows 200 then, 150 now" in p.stderr
    x[0, 0] += 1  # one value changed in place
    np.savez(tmp_path / "d.npz", x=x, y=y)
    p = run_local("conf/digits.yaml", out, *sets, "train.epochs=6", resume=True)
    assert p.returncode == 2 and "the data changed since the checkpoint: first rows " in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_a_step_is_broken_down_by_kind_and_held_out_evaluation_is_not_the_loop(tmp_path):
    """Time the loop spends between steps (here a slow metrics consumer) is `other`; an
    evaluation between steps is not (its records are slow too, and are left out)."""
    import time

    cfg = config.load(ROOT / "conf/digits.yaml", ["train.epochs=1", "train.max_steps=8", "train.log_every=2",
                                                  "train.eval_every=1", "model.hidden=[16]"])

    def slow(rec):
        time.sleep(0.04 if rec["kind"] == "step" else 0.2)

    result = fit(cfg, LocalComm(), WorkerData.whole(data.digits(), 10), on_record=slow)
    seconds = result.summary["seconds"]
    assert list(seconds) == ["data", "compute", "optimizer", "comm", "wait", "other"]
    assert seconds["optimizer"] > 0 and seconds["compute"] > 0
    # 3 logged steps' sleeps fall between steps (the 4th after the last); 8 evaluations' do not
    assert 0.11 <= seconds["other"] < 0.5, seconds


HEAP_PROBE = """
import ctypes, resource, sys, torch
from dist_train import device
ctypes.CDLL(None).mallopt(device.M_MMAP_THRESHOLD, 128 << 10)  # glibc's first threshold, held (as a process may)
def faults(steps=50):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        torch.ones(1 << 18)  # a 1 MB activation, made and freed as a step makes and frees them
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps
faults()
held = faults()
device.keep_heap()
faults()
print(held, faults())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_a_training_process_keeps_its_heap_instead_of_faulting_each_steps_memory_in():
    """Where glibc maps each ~1 MB allocation afresh (as it did in Spark's Python workers),
    every one costs its 256 pages' faults; after keep_heap the next step reuses them."""
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    mapped, kept = map(float, out.stdout.split())
    assert mapped >= 200 and kept < 5, (mapped, kept)
