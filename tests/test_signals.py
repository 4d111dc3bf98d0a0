"""SIGTERM and SIGINT to the `dist-train mpi` and `dist-train spark` wrappers (what
Kubernetes, systemd and Ctrl-C send): forwarded to mpirun / spark-submit, which end their
workers; the wrapper waits for them and exits 128 + the signal; nothing of the job is
left running or in /dev/shm, and nothing is written after."""

import os
import signal
import subprocess
import time

import pytest

from .helpers import BIN, ROOT, env

SETS = ["--set", "train.epochs=100000", "--set", "train.log_every=20"]


def processes(pattern: str) -> set[str]:
    return set(subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split())


@pytest.mark.parametrize("launcher,signum", [("mpi", signal.SIGTERM), ("mpi", signal.SIGINT),
                                             ("spark", signal.SIGTERM)], ids=["mpi-term", "mpi-int", "spark-term"])
def test_a_signal_to_the_wrapper_ends_the_whole_job_and_leaves_nothing(launcher, signum, tmp_path):
    out = tmp_path / "run"
    cmd = [BIN / "dist-train", launcher, "conf/digits.yaml", "--out", out, *SETS]
    cmd += ["-n", "2"] if launcher == "mpi" else ["--master", "local[2]", "--spark-arg=--conf",
                                                  "--spark-arg=spark.ui.enabled=false"]
    shm, daemons = set(os.listdir("/dev/shm")), processes("pyspark.daemon")
    wrapper = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
            assert wrapper.poll() is None and time.monotonic() < deadline, "the job never started training"
            time.sleep(0.1)
        assert processes(str(out)) - {str(wrapper.pid)}, "the job runs in processes of its own"
        wrapper.send_signal(signum)
        _, err = wrapper.communicate(timeout=60)
    finally:
        if wrapper.poll() is None:
            os.killpg(wrapper.pid, signal.SIGKILL)
    assert wrapper.returncode == 128 + signum, err[-2000:]
    assert f"error: interrupted by {signum.name}" in err
    deadline = time.monotonic() + 10
    while (left := processes(str(out)) | (processes("pyspark.daemon") - daemons)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"left running: {left}"
    assert set(os.listdir("/dev/shm")) <= shm, f"left in /dev/shm: {set(os.listdir('/dev/shm')) - shm}"
    time.sleep(2)
    assert not (out / "model.pt").exists(), "nothing is written after the signal"
