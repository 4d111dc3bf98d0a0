"""Restarts: `dist-train mpi --max-restarts N` starts a failed job again from its newest
checkpoint (bit for bit what an unbroken run gives), never repeats a failure a restart
would only repeat, and stops after N; a resume may change the world size under global
sampling, and is refused, with advice that holds, under shard sampling."""


import pytest
import torch

from dist_train.files import attempt_fence, claim_attempt
from dist_train.train.outputs import RunWriter, StaleRun

from .helpers import BIN, assert_same_weights, local, mpirun, ok, run, weights

FAULTY = ["model.target=tests.faulty:model", "train.epochs=3", "checkpoint.every_steps=10", "train.log_every=0"]


def dist_train_mpi(out, *sets, extra=()):
    return run([BIN / "dist-train", "mpi", "-n", "2", "conf/digits.yaml", "--out", out,
                *[a for s in sets for a in ("--set", s)], *extra], timeout=240)


def test_an_older_attempt_may_not_write_once_a_newer_one_claimed_the_run(tmp_path):
    assert attempt_fence(tmp_path, None) is None and attempt_fence(None, 1) is None
    claim_attempt(tmp_path / "run", 1)
    first = attempt_fence(tmp_path / "run", 1)
    assert first()
    claim_attempt(tmp_path / "run", 2)
    assert not first() and attempt_fence(tmp_path / "run", 2)()


def test_an_older_attempts_rank_0_writes_no_model_once_a_newer_one_claimed_the_run(tmp_path):
    claim_attempt(tmp_path, 1)
    old = RunWriter(tmp_path, active=True, stream=None, fence=attempt_fence(tmp_path, 1))
    claim_attempt(tmp_path, 2)
    with pytest.raises(StaleRun, match="a newer attempt owns"):
        old.final({"state_dict": {}}, {"steps": 1})
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "summary.json").exists()
    RunWriter(tmp_path, active=True, stream=None, fence=attempt_fence(tmp_path, 2)).final({"state_dict": {}},
                                                                                         {"steps": 1})
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "summary.json").is_file()


@pytest.mark.slow
def test_a_failed_job_restarts_from_its_newest_checkpoint_bit_for_bit(tmp_path):
    p = ok(dist_train_mpi(tmp_path / "run", *FAULTY, f"model.kwargs={{fail_step: 25, marker: {tmp_path / 'once'}}}",
                          extra=["--max-restarts", "2"]))
    assert "attempt 1 failed (exit 1); restarting from the newest checkpoint, attempt 2 of 3" in p.stderr
    assert "resumed at step 20" in p.stdout
    assert not (tmp_path / "run" / ".attempt").exists()
    ok(dist_train_mpi(tmp_path / "straight", *FAULTY, "model.kwargs={fail_step: 100000}"))
    a, b = weights(tmp_path / "run"), weights(tmp_path / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_restarts_stop_after_n_and_skip_failures_a_restart_would_repeat(tmp_path):
    p = dist_train_mpi(tmp_path / "always", *FAULTY, "model.kwargs={fail_step: 25}", "mpi.max_restarts=1")
    assert p.returncode == 1 and p.stderr.count("injected failure at step 25") >= 2, p.stderr[-3000:]
    assert "attempt 1 failed" in p.stderr and "attempt 2 failed" not in p.stderr
    p = dist_train_mpi(tmp_path / "nan", *FAULTY, "model.kwargs={fail_step: 5, mode: nan}",
                       extra=["--max-restarts", "3"])
    assert p.returncode == 3 and "non-finite loss at step 5" in p.stderr and "restarting" not in p.stderr


@pytest.mark.slow
def test_a_plain_mpirun_says_it_cannot_restart_itself(tmp_path):
    p = ok(mpirun(2, "conf/digits.yaml", tmp_path / "run", "train.epochs=1", "mpi.max_restarts=2",
                  "train.log_every=0"))
    assert p.stderr.count("mpi.max_restarts=2 does nothing under a plain mpirun") == 1, p.stderr[-2000:]


@pytest.mark.slow
def test_global_sampling_resumes_on_another_world_size(tmp_path):
    """A host lost: 2 ranks to step 40, 3 ranks on to step 80 == local mode straight to 80."""
    sets = ["data.sampling=global", "train.epochs=100", "train.log_every=0"]
    ok(mpirun(2, "conf/digits.yaml", tmp_path / "run", *sets, "train.max_steps=40"))
    p = ok(mpirun(3, "conf/digits.yaml", tmp_path / "run", *sets, "train.max_steps=80", resume=True))
    assert "world 3" in p.stdout and "resumed at step 40" in p.stdout
    ok(local("conf/digits.yaml", tmp_path / "straight", *sets, "train.max_steps=80"))
    assert_same_weights(tmp_path / "run", tmp_path / "straight")


@pytest.mark.slow
def test_shard_sampling_refuses_another_world_size_with_advice_that_holds(tmp_path):
    sets = ["train.epochs=1", "train.log_every=0"]
    ok(mpirun(2, "conf/digits.yaml", tmp_path / "run", *sets))
    p = local("conf/digits.yaml", tmp_path / "run", "train.epochs=2", "train.log_every=0", resume=True)
    assert p.returncode == 2, p.stderr[-2000:]
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --resume: the checkpoint was trained by 2 workers with data.sampling shard")
    assert "resume with 2 workers" in line and "Traceback" not in p.stderr
    # the advice holds: switching the sampling of a run is refused, so it names the start of a run
    p = local("conf/digits.yaml", tmp_path / "run", "train.epochs=2", "data.sampling=global", resume=True)
    assert p.returncode == 2 and "data.sampling" in p.stderr
