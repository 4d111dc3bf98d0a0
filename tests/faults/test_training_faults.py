"""Faults injected for real (user models named by model.target that return NaN, drift,
stall or die on a chosen rank and step; SIGKILL of a whole job): every one ends the job
at the same step everywhere with a message naming the step and rank, or resumes exactly."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ..helpers import ROOT, env, errors, local, mpirun, mpirun_cmd, ok, weights


FAULTY = ["model.target=tests.faulty:model", "train.epochs=30", "train.log_every=0"]


def test_nan_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    start = time.monotonic()
    p = mpirun(2, "conf/digits.yaml", tmp_path / "o", *FAULTY, "model.kwargs={fail_rank: 1, fail_step: 3, mode: nan}",
               timeout=60)
    assert p.returncode == 3 and time.monotonic() - start < 30
    assert errors(p) == ["error: non-finite loss at step 3 on rank(s) 1 "
                         "(set train.skip_nonfinite: true to skip such steps)"]
    assert "Traceback" not in p.stderr


def test_nan_steps_can_be_skipped_by_every_rank_together(tmp_path):
    ok(mpirun(2, "conf/digits.yaml", tmp_path / "o", *FAULTY, "train.epochs=2", "train.skip_nonfinite=true",
              "model.kwargs={fail_rank: 0, fail_step: 3, mode: nan}"))
    s = __import__("json").loads((tmp_path / "o" / "summary.json").read_text())
    assert s["skipped_nonfinite_steps"] == 1 and s["final_train_loss"] == s["final_train_loss"]  # not NaN
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "o").values())


def test_nan_in_local_mode(tmp_path):
    p = local("conf/digits.yaml", tmp_path / "o", *FAULTY, "model.kwargs={fail_rank: 0, fail_step: 2, mode: nan}")
    assert p.returncode == 3 and errors(p)[0].startswith("error: non-finite loss at step 2 on rank(s) 0")


def test_workers_whose_parameters_drift_apart_are_stopped(tmp_path):
    p = mpirun(3, "conf/digits.yaml", tmp_path / "o", *FAULTY, "comm.check_every_steps=2",
               "model.kwargs={fail_rank: 2, fail_step: 3, mode: drift}", timeout=60)
    assert p.returncode == 3
    assert errors(p)[0].startswith("error: parameters differ across workers at step 4: rank(s) 2 differ from rank 0")


def mpi_segments(root: int) -> set[Path]:
    """The /dev/shm files that Open MPI's processes under `root` (mpirun and its ranks) have mapped."""
    pids, found = [str(root)], set()
    while pids:
        pid = pids.pop()
        pids += subprocess.run(["pgrep", "-P", pid], capture_output=True, text=True).stdout.split()
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        found |= {Path(line.split()[-1]) for line in maps.splitlines() if "/dev/shm/sm_segment" in line}
    return found


def test_kill_9_of_the_whole_job_then_resume_is_exact(tmp_path):
    sets = ["model.hidden=[512, 512]", "train.epochs=60", "checkpoint.every_steps=50", "train.momentum=0.9",
            "train.log_every=0"]
    ok(mpirun(2, "conf/digits.yaml", tmp_path / "straight", *sets))
    out = tmp_path / "killed"
    cmd = mpirun_cmd(2, [sys.executable, ROOT / "launchers/mpi.py", "conf/digits.yaml", "--out", out,
                         *[a for s in sets for a in ("--set", s)]])
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list((out / "checkpoints").glob("*.sha256")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.uniform(0, 0.3))  # somewhere in the middle of training
    segments = mpi_segments(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert segments, "found no Open MPI segment to look after"
    for path in segments:  # Open MPI's own, which a SIGKILLed mpirun cannot remove: as an operator would
        path.unlink(missing_ok=True)
    deadline = time.monotonic() + 5  # orphaned ranks notice their parent is gone within a second
    while (left := subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left behind: {left}"
    assert not (out / "model.pt").exists(), "killed before the end"
    ok(mpirun(2, "conf/digits.yaml", out, *sets, resume=True))
    for k, v in weights(tmp_path / "straight").items():
        assert torch.equal(v, weights(out)[k]), k


@pytest.mark.parametrize("sleeper", [1, 0])
def test_a_stalled_rank_is_named_with_its_step_under_mpi(tmp_path, sleeper):
    start = time.monotonic()
    p = mpirun(3, "conf/digits.yaml", tmp_path / "o", *FAULTY, "comm.timeout_s=3",
               f"model.kwargs={{fail_rank: {sleeper}, fail_step: 4, mode: sleep}}", timeout=90)
    assert p.returncode != 0 and time.monotonic() - start < 30
    assert errors(p)[0].startswith(f"error: rank(s) {sleeper} stalled: no progress for 3 s at step 4"), p.stderr[-3000:]


def test_every_rank_busy_past_the_timeout_is_no_stall(tmp_path):
    """The watchdog names ranks behind the others that made no progress: ranks that all
    pause together (a long evaluation, say) are not behind, whenever each reports."""
    ok(mpirun(3, "conf/digits.yaml", tmp_path / "o", *FAULTY, "train.epochs=2", "comm.timeout_s=3",
              "model.kwargs={fail_rank: -1, fail_step: 4, mode: pause}", timeout=90))
