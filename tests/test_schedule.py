"""Schedules against their formulas; accumulating k micro-batches equals one batch k times larger;
bf16 keeps the fused buffers float32."""

import json
import math

import pytest
import torch

from dist_train import config
from dist_train.train import schedule

from .helpers import ROOT, weights
from dist_train.launchers import local


def t(**sets):
    return config.load(None, [f"train.{k}={v}" for k, v in sets.items()]).train


def test_warmup_then_cosine():
    tr = t(lr=0.1, warmup_steps=10, schedule="cosine")
    assert schedule.lr_at(tr, 0, 110) == pytest.approx(0.01)
    assert schedule.lr_at(tr, 9, 110) == pytest.approx(0.1)
    assert schedule.lr_at(tr, 60, 110) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 50 / 100)))
    assert schedule.lr_at(tr, 110, 110) == pytest.approx(0.0, abs=1e-12)


def test_step_decay_and_batch_scaling():
    tr = t(lr=0.1, schedule="step", decay_every=5, decay_factor=0.5)
    assert [schedule.lr_at(tr, s, 0) for s in (0, 4, 5, 12)] == pytest.approx([0.1, 0.1, 0.05, 0.025])
    assert schedule.lr_at(t(lr=0.1, lr_scaling="linear", base_batch=32, batch_size=64, accumulate=2), 0, 0) == \
        pytest.approx(0.4)
    assert schedule.lr_at(t(lr=0.1, lr_scaling="sqrt", base_batch=32, batch_size=128), 0, 0) == pytest.approx(0.2)


def run(tmp_path, name, *sets):
    out = tmp_path / name
    argv = [str(ROOT / "conf/digits.yaml"), "--out", str(out), "--set", "model.hidden=[32]", "--set",
            "train.epochs=2", "--set", "train.shuffle=false", "--set", "train.log_every=1"]
    assert local.main(argv + [a for s in sets for a in ("--set", s)]) == 0
    return out


def test_accumulating_k_micro_batches_equals_one_batch_k_times_larger(tmp_path):
    big = run(tmp_path, "big", "train.batch_size=96")
    acc = run(tmp_path, "acc", "train.batch_size=32", "train.accumulate=3")
    for k, v in weights(big).items():
        torch.testing.assert_close(v, weights(acc)[k], atol=1e-5, rtol=1e-4)
    steps = lambda o: json.loads((o / "summary.json").read_text())["steps"]  # noqa: E731
    assert steps(big) == steps(acc)


def test_logged_lr_follows_the_schedule(tmp_path):
    out = run(tmp_path, "sched", "train.warmup_steps=4", "train.schedule=step", "train.decay_every=10",
              "train.decay_factor=0.5")
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
           if r["kind"] == "step"}
    assert lrs[1] == pytest.approx(0.025) and lrs[4] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.05)


def test_bf16_trains_with_float32_gradient_buffers(tmp_path):
    out = run(tmp_path, "bf16", "train.precision=bf16")
    s = json.loads((out / "summary.json").read_text())
    assert s["eval"]["accuracy"] > 0.8
    assert all(v.dtype == torch.float32 for v in weights(out).values())
