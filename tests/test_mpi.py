"""MPI launcher, really run under mpirun: equivalence with local mode, uneven and empty
shards, failures that end the job instead of hanging, exact resume."""

import json
import sys
import time

import numpy as np
import pytest
import torch

from dist_train import config, data

from .helpers import ROOT, assert_same_weights, errors, local, mpirun, mpirun_cmd, ok, oracle_sgd, run, weights


SMALL = ["train.epochs=2", "model.hidden=[32]", "train.log_every=0"]


@pytest.fixture(scope="module")
def local_global(tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "run"
    ok(local("conf/digits.yaml", out, *SMALL, "data.sampling=global"))
    return out


@pytest.mark.parametrize("n", [1, 2, 3])
def test_global_sampling_matches_local_mode(n, local_global, tmp_path):
    out = tmp_path / "mpi"
    ok(mpirun(n, "conf/digits.yaml", out, *SMALL, "data.sampling=global"))
    assert_same_weights(out, local_global)
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == n and s["launcher"] == "mpi"
    assert s["steps"] == json.loads((local_global / "summary.json").read_text())["steps"]


def tiny_npz(tmp_path, rows):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((rows, 5)).astype(np.float32)
    path = tmp_path / f"tiny{rows}.npz"
    np.savez(path, x=x, y=np.arange(rows) % 2)
    return path


@pytest.mark.parametrize("rows,n,batch", [(11, 3, 4), (2, 3, 3)], ids=["uneven", "empty-shard"])
def test_uneven_and_empty_shards_finish_and_match_the_oracle(rows, n, batch, tmp_path):
    path = tiny_npz(tmp_path, rows)
    sets = ["data.name=npz", f"data.path={path}", "data.eval_fraction=0", f"train.batch_size={batch}",
            "train.epochs=3", "model.hidden=[4]", "train.optimizer=sgd", "train.lr=0.5", "train.log_every=1"]
    out = tmp_path / "mpi"
    ok(mpirun(n, "conf/xor.yaml", out, *sets))
    cfg = config.load("conf/xor.yaml", sets)
    ds = data.load_npz(path)
    expected = oracle_sgd(cfg, ds, 2, n)
    for k, v in weights(out).items():
        torch.testing.assert_close(v, expected[k], atol=1e-6, rtol=1e-5)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["samples"] for r in lines if r["kind"] == "epoch") > 0
    per_epoch = [r for r in lines if r["kind"] == "epoch"]
    assert [r["samples"] for r in per_epoch] == [rows * (e + 1) for e in range(3)]  # every row once per epoch


def test_uneven_global_sampling_matches_local(tmp_path):
    path = tiny_npz(tmp_path, 23)
    sets = ["data.name=npz", f"data.path={path}", "data.eval_fraction=0", "train.batch_size=5",
            "train.epochs=2", "model.hidden=[4]", "data.sampling=global"]
    ok(local("conf/xor.yaml", tmp_path / "l", *sets))
    ok(mpirun(3, "conf/xor.yaml", tmp_path / "m", *sets))
    assert_same_weights(tmp_path / "m", tmp_path / "l", atol=1e-6)


@pytest.mark.parametrize("mode,words", [("raise", ["RuntimeError", "injected failure at step 3"]),
                                        ("kill", [])])
def test_a_failing_rank_ends_the_job_fast(mode, words, tmp_path):
    start = time.monotonic()
    p = mpirun(2, "conf/digits.yaml", tmp_path / "out", "train.epochs=50", "model.target=tests.faulty:model",
               f"model.kwargs={{fail_rank: 1, fail_step: 3, mode: {mode}}}", timeout=60)
    elapsed = time.monotonic() - start
    assert p.returncode != 0
    assert elapsed < 30, f"took {elapsed:.1f}s"
    if words:
        assert "[rank 1]" in p.stderr and "Traceback" in p.stderr
        for w in words:
            assert w in p.stderr
        assert "rank 1 failed with RuntimeError" in p.stderr
    else:  # a signal: mpirun names the process that died, or the rank that watched or waited for it does
        named = "signal 9" in p.stderr or "Killed" in p.stderr or "killed" in p.stderr
        assert named or "error: rank 1 exited at step 3" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "out" / "model.pt").exists()


def test_bad_config_under_mpirun_is_one_line_and_exit_2(tmp_path):
    p = mpirun(2, "conf/xor.yaml", tmp_path / "out", "train.lr=-1", timeout=60)
    assert p.returncode != 0
    assert errors(p) == ["error: config error: train.lr: must be > 0, got -1.0"]
    assert "Traceback" not in p.stderr


def test_resume_under_mpi_gives_the_same_weights(tmp_path):
    base = ["model.hidden=[32]", "train.log_every=0", "train.momentum=0.5", "checkpoint.every_steps=10",
            "train.epochs=3"]
    ok(mpirun(2, "conf/digits.yaml", tmp_path / "straight", *base))
    ok(mpirun(2, "conf/digits.yaml", tmp_path / "resumed", *base, "train.max_steps=25"))
    p = mpirun(2, "conf/digits.yaml", tmp_path / "resumed", *base)
    assert p.returncode != 0 and "--resume" in p.stderr  # never overwrites a run without --resume
    ok(mpirun(2, "conf/digits.yaml", tmp_path / "resumed", *base, resume=True))
    for k, v in weights(tmp_path / "straight").items():
        assert torch.equal(v, weights(tmp_path / "resumed")[k]), k


def test_shared_memory_sums_give_the_same_weights_as_mpi_allreduce_bit_for_bit(tmp_path):
    """2 ranks: a + b either way (the mean is taken before backward, so there is no division after)."""
    sets = ["model.hidden=[32]", "train.log_every=0", "train.epochs=2"]
    ok(mpirun(2, "conf/digits.yaml", tmp_path / "shm", *sets, "comm.shm=true"))
    ok(mpirun(2, "conf/digits.yaml", tmp_path / "mpi", *sets, "comm.shm=false"))
    for k, v in weights(tmp_path / "shm").items():
        assert torch.equal(v, weights(tmp_path / "mpi")[k]), k


@pytest.mark.parametrize("n,hosts", [(3, 1), (4, 2), (3, 2)], ids=["one-host", "two-by-two", "two-and-one"])
def test_the_shared_memory_gradient_buffer_sums_within_and_across_hosts(n, hosts):
    """MPIComm with its ranks posed as `hosts` hosts: shared memory within each, part i of the
    buffer across hosts by local rank i; every rank ends with the same mean gradients.
    And rank 0's parameters reach every rank, in place and packed."""
    p = ok(run(mpirun_cmd(n, [sys.executable, ROOT / "tests/mpi_hosts_worker.py", hosts]), timeout=60))
    results = json.loads(p.stdout.strip().splitlines()[-1])
    s = sum(range(1, n + 1))  # rank r adds (r + 1)(step + 1) i and counts 2 (r + 1) samples
    for rank, out in enumerate(results):
        assert out["shared"] == (len(range(rank % hosts, n, hosts)) > 1), (rank, out)
        for step in range(3):
            first, second, third, total, count = out[f"step {step}"]
            assert [first, second, third, count] == [0.0, (step + 1) / 2, step + 1, 2 * s], (rank, out)
            assert total == pytest.approx((step + 1) * 5000 * 4999 / 4)
        assert out["other"] == sum(range(n))
        assert out["broadcast"] == [1.0], (rank, out["broadcast"])  # rank 0's parameters and buffers


def test_step_times_are_averaged_over_ranks_and_waiting_is_told_apart(tmp_path):
    """Rank 1 sleeps 50 ms in every forward pass: rank 0 waits about that long at each
    exchange, so the mean over the two ranks shows ~25 ms of waiting and >= 25 ms of compute."""
    out = tmp_path / "slow"
    ok(mpirun(2, "conf/digits.yaml", out, "model.target=tests.faulty:model", "model.kwargs={mode: slow}",
              "train.epochs=1", "train.batch_size=128", "train.log_every=4", "train.max_steps=9"))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [4, 8]
    for r in steps:
        assert 15 <= r["wait_ms"] <= 35 and r["compute_ms"] >= 25 and r["comm_ms"] < 15, r
    s = json.loads((out / "summary.json").read_text())
    rank0, mean = s["seconds"], s["seconds_mean_over_workers"]
    assert rank0["wait"] / s["steps_run"] >= 0.03  # rank 0 itself waited ~50 ms a step
    assert 0.3 <= mean["wait"] / rank0["wait"] <= 0.7  # rank 1 hardly waited


def test_a_plain_mpirun_piped_to_a_file_gets_lines_not_a_progress_bar(tmp_path):
    """mpirun gives each rank a pty, whatever mpirun's own output is: rank 0 asks where mpirun writes."""
    p = ok(mpirun(2, "conf/digits.yaml", tmp_path / "run", "train.epochs=2", "train.log_every=10"))
    assert "\r" not in p.stdout and "step     10  epoch   0" in p.stdout, p.stdout[-500:]
