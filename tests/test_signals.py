"""Preemption: SIGTERM, SIGINT and SIGUSR1 (what SLURM's --signal, Kubernetes, spot reclaim
and Ctrl-C send) to the `dist-train` wrappers, to one worker, or to a user's own mpirun.
Every worker finishes the same step, rank 0 checkpoints it, every process exits 128 + the
signal with one line, nothing is left running or in /dev/shm, and --resume continues bit
for bit. A second signal ends at once; a signal before training starts ends at once."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from .helpers import BIN, ROOT, env, mpirun_cmd, ok, run, weights

pytestmark = pytest.mark.slow

LONG = ["train.epochs=100000", "train.log_every=20"]
SPARK = ["--master", "local[2]", "--spark-arg=--conf", "--spark-arg=spark.ui.enabled=false"]


def processes(pattern: str) -> set[str]:
    return set(subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split())


def sets(*pairs):
    return [a for s in pairs for a in ("--set", s)]


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _end_what_a_test_started():
    """A failed assertion leaves no job training on."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start(cmd, log) -> subprocess.Popen:
    """`cmd` in a session of its own, stdout and stderr into the file `log` (spark-submit puts
    the Python driver's stderr on its stdout)."""
    with open(log, "w") as f:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env(), start_new_session=True,
                                stdout=f, stderr=subprocess.STDOUT)
    proc.log = log
    STARTED.append(proc)
    return proc


def wait_training(proc, out, timeout=120):
    deadline = time.monotonic() + timeout
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, "the job never started training"
        time.sleep(0.05)


def finish(proc, timeout=60) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.log.read_text()


def assert_nothing_left(out, shm, daemons=frozenset()):
    deadline = time.monotonic() + 10
    while (left := processes(str(out)) | (processes("pyspark.daemon") - daemons)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"left running: {left}"
    assert set(os.listdir("/dev/shm")) <= shm, f"left in /dev/shm: {set(os.listdir('/dev/shm')) - shm}"
    assert not [p for p in out.rglob("*.tmp")], "a temporary file was left"


def stopped_step(err: str, signum) -> int:
    line = [x for x in err.splitlines() if x.startswith(f"[dist-train] stopped by {signum.name}")]
    assert len(line) == 1, err[-3000:]
    assert "continue with --resume" in line[0]
    return int(line[0].split(" at step ")[1].split(":")[0])


@pytest.mark.parametrize("launcher,signum", [("mpi", signal.SIGTERM), ("mpi", signal.SIGINT),
                                             ("spark", signal.SIGTERM), ("local", signal.SIGUSR1)],
                         ids=["mpi-term", "mpi-int", "spark-term", "local-usr1"])
def test_a_signal_to_the_job_checkpoints_the_step_and_stops_everything(launcher, signum, tmp_path):
    out = tmp_path / "run"
    cmd = [BIN / "dist-train", launcher, "conf/digits.yaml", "--out", out, *sets(*LONG)]
    cmd += {"mpi": ["-n", "2"], "spark": SPARK, "local": []}[launcher]
    shm, daemons = set(os.listdir("/dev/shm")), processes("pyspark.daemon")
    wrapper = start(cmd, tmp_path / "log")
    wait_training(wrapper, out, timeout=120)
    wrapper.send_signal(signum)
    t0 = time.monotonic()
    err = finish(wrapper)
    assert time.monotonic() - t0 < 20, "stopping took too long"
    assert wrapper.returncode == 128 + signum, err[-3000:]
    step = stopped_step(err, signum)
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-2:] == [f"step-{step:08d}.pt",
                                                                          f"step-{step:08d}.pt.sha256"]
    assert "Traceback" not in err, err[-3000:]
    assert not (out / "model.pt").exists(), "a stopped run is not a finished one"
    assert_nothing_left(out, shm, daemons)


def test_a_stopped_run_resumes_bit_for_bit(tmp_path):
    """local mode, SIGTERM mid-epoch: stop + --resume == never stopped."""
    common = ["conf/digits.yaml", *sets("train.epochs=1000", "train.max_steps=2500", "train.log_every=20")]
    ok(run([sys.executable, "-m", "dist_train.cli", "local", *common, "--out", tmp_path / "straight"]))
    job = start([sys.executable, "-m", "dist_train.cli", "local", *common, "--out", tmp_path / "stopped"],
                tmp_path / "log")
    wait_training(job, tmp_path / "stopped")
    job.send_signal(signal.SIGTERM)
    err = finish(job)
    assert job.returncode == 143, err[-3000:]
    step = stopped_step(err, signal.SIGTERM)
    assert 0 < step < 2500
    p = ok(run([sys.executable, "-m", "dist_train.cli", "local", *common, "--out", tmp_path / "stopped",
                "--resume"]))
    assert f"resumed at step {step}" in p.stdout
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "stopped")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """A user's own mpirun; SIGTERM to rank 1 only (a node's OOM killer, a scheduler): the
    flag travels in the step's tail, rank 0 checkpoints, both ranks exit 143."""
    out = tmp_path / "run"
    shm = set(os.listdir("/dev/shm"))
    job = start(mpirun_cmd(2, [sys.executable, ROOT / "launchers/mpi.py", "conf/digits.yaml", "--out", out,
                               *sets(*LONG)]), tmp_path / "log")
    wait_training(job, out)
    ranks = sorted(processes(f"python.* {ROOT}/launchers/mpi.py conf/digits.yaml --out {out}") - {str(job.pid)},
                   key=int)
    assert len(ranks) == 2, ranks
    os.kill(int(ranks[1]), signal.SIGTERM)  # the younger process: rank 1 (the order mpirun starts them in)
    err = finish(job)
    assert job.returncode == 143, err[-3000:]
    stopped_step(err, signal.SIGTERM)
    assert "asked of rank" in err
    assert_nothing_left(out, shm)


def test_sigusr1_to_a_users_mpirun_reaches_every_rank(tmp_path):
    """Open MPI's mpirun kills its ranks at once on SIGTERM, but passes SIGUSR1 on (SLURM:
    --signal=B:USR1@60): that is the signal to give it."""
    out = tmp_path / "run"
    job = start(mpirun_cmd(2, [sys.executable, ROOT / "launchers/mpi.py", "conf/digits.yaml", "--out", out,
                               *sets(*LONG)]), tmp_path / "log")
    wait_training(job, out)
    job.send_signal(signal.SIGUSR1)
    err = finish(job)
    assert job.returncode == 128 + signal.SIGUSR1, err[-3000:]
    stopped_step(err, signal.SIGUSR1)


def test_a_second_ctrl_c_ends_at_once(tmp_path):
    """The first SIGINT waits for the step (here one that takes 4.5 s); the second does not."""
    out, beat = tmp_path / "run", tmp_path / "beat"
    job = start([sys.executable, "-m", "dist_train.cli", "local", "conf/digits.yaml", "--out", out,
                 *sets("model.target=tests.faulty:model", "train.epochs=50",
                       f"model.kwargs={{mode: pause, fail_rank: -1, fail_step: 5, heartbeat: {beat}}}")], tmp_path / "log")
    deadline = time.monotonic() + 60
    while not (beat.with_name("beat.0").exists() and beat.with_name("beat.0").read_text() == "5"):
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    job.send_signal(signal.SIGINT)
    time.sleep(0.3)
    t0 = time.monotonic()
    job.send_signal(signal.SIGINT)
    err = finish(job)
    assert time.monotonic() - t0 < 3, "the second Ctrl-C did not end the run at once"
    assert job.returncode == 130, err[-3000:]
    assert "error: interrupted at step 5" in err


def test_a_signal_before_training_ends_the_job_at_once(tmp_path):
    """Spark still starting (nothing to checkpoint yet): the wrapper stops it as before."""
    out = tmp_path / "run"
    shm, daemons = set(os.listdir("/dev/shm")), processes("pyspark.daemon")
    wrapper = start([BIN / "dist-train", "spark", "conf/digits.yaml", "--out", out, *sets(*LONG), *SPARK],
                    tmp_path / "log")
    time.sleep(2)
    assert wrapper.poll() is None
    wrapper.send_signal(signal.SIGTERM)
    err = finish(wrapper)
    assert wrapper.returncode == 143, err[-2000:]
    assert "error: interrupted by SIGTERM" in err
    assert_nothing_left(out, shm, daemons)
    assert not (out / "model.pt").exists() and not (out / "checkpoints").exists()
