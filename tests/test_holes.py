"""The holes of issue 15, each really run: a frozen rank 0 off the shared-memory path
(SIGSTOP, and a C call holding the GIL), a rank that leaves early (SystemExit, os._exit),
workers started with different configs or data (MPMD mpirun), and one run per --out."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from .helpers import BIN, ROOT, env, errors, mpirun, mpirun_cmd, run


FAULTY = ["model.target=tests.faulty:model", "train.epochs=50", "train.log_every=0"]


def injected_at(marker) -> float:
    return float(marker.read_text())


@pytest.mark.parametrize("mode", ["stop", "gil"])
def test_a_frozen_rank_0_off_shared_memory_ends_the_job_naming_it(mode, tmp_path):
    """comm.shm false (the path between hosts): rank 0 stopped (SIGSTOP) or stuck in a regex
    that holds the GIL, so no thread of it runs. Its watcher names it after comm.timeout_s."""
    marker = tmp_path / "frozen"
    p = mpirun(2, "conf/digits.yaml", tmp_path / "o", *FAULTY, "comm.shm=false", "comm.timeout_s=3",
               f"model.kwargs={{fail_rank: 0, fail_step: 4, mode: {mode}, stamp: '{marker}'}}", timeout=90)
    ended = time.time()
    assert p.returncode != 0
    assert ended - injected_at(marker) < 3 + 8, f"{ended - injected_at(marker):.1f} s after rank 0 froze"
    lines = errors(p)
    assert lines and lines[0].startswith("error: rank 0 stalled: no heartbeat for 3 s at step 4"), p.stderr[-3000:]
    assert not (tmp_path / "o" / "model.pt").exists()


@pytest.mark.parametrize("mode", ["exit", "os_exit"])
def test_a_rank_that_leaves_early_ends_the_job_within_seconds(mode, tmp_path):
    """sys.exit(0) (a clean-looking exit) or os._exit(0) on rank 1 at step 3, while rank 0
    trains on: not a stall after comm.timeout_s (300 s here), but `rank 1 exited at step 3`."""
    start = time.monotonic()
    p = mpirun(2, "conf/digits.yaml", tmp_path / "o", *FAULTY,
               f"model.kwargs={{fail_rank: 1, fail_step: 3, mode: {mode}}}", timeout=90)
    assert p.returncode != 0 and time.monotonic() - start < 30
    lines = errors(p)
    assert lines and lines[0].startswith("error: rank 1 exited at step 3"), p.stderr[-3000:]
    assert not (tmp_path / "o" / "model.pt").exists()


def test_the_whole_job_paused_past_the_timeout_then_continued_is_no_stall(tmp_path):
    """SIGSTOP of every rank for longer than comm.timeout_s (a suspended allocation, Ctrl-Z),
    then SIGCONT: the job goes on; no rank blames another for the pause they all had."""
    import os
    import signal

    out = tmp_path / "o"
    cmd = mpirun_cmd(2, [sys.executable, ROOT / "launchers/mpi.py", "conf/digits.yaml", "--out", out, "--set",
                         "train.epochs=40", "--set", "train.log_every=5", "--set", "comm.timeout_s=2"])
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    ranks = [int(p) for p in subprocess.run(["pgrep", "-f", f"launchers/mpi.py conf/digits.yaml --out {out}"],
                                             capture_output=True, text=True).stdout.split()]
    ranks = [p for p in ranks if p != proc.pid]
    assert len(ranks) == 2, ranks
    for pid in ranks:
        os.kill(pid, signal.SIGSTOP)
    time.sleep(4)
    for pid in ranks:
        os.kill(pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "error:" not in err, err[-3000:]


def mpmd(tmp_path, first: list[str], second: list[str], config="conf/digits.yaml"):
    """mpirun with two app contexts: rank 0 with `first`, rank 1 with `second` (--set values)."""
    out = tmp_path / "o"

    def app(sets):
        return [sys.executable, ROOT / "launchers/mpi.py", config, "--out", out,
                *[a for s in ["train.epochs=1", "train.log_every=0", *sets] for a in ("--set", s)]]

    return run(mpirun_cmd(1, [*app(first), ":", "-n", "1", *app(second)]), timeout=90)


@pytest.mark.parametrize("first,second,key", [
    (["model.hidden=[32]"], ["model.hidden=[64]"], "model.hidden"),
    (["train.lr=0.1"], ["train.lr=0.2"], "train.lr"),
    (["comm.shm=true"], ["comm.shm=false"], "comm.shm"),  # decided before the shared-memory setup's collectives
], ids=["model", "lr", "shm"])
def test_mpmd_ranks_with_different_configs_stop_with_one_line(tmp_path, first, second, key):
    p = mpmd(tmp_path, first, second)
    assert p.returncode == 2, p.stderr[-3000:]
    assert errors(p) == [errors(p)[0]] and "Traceback" not in p.stderr and "malloc" not in p.stderr
    line = errors(p)[0]
    assert line.startswith(f"error: workers started differently: rank(s) 1 differ from rank 0 on {key}"), line
    assert not (tmp_path / "o" / "model.pt").exists()


def test_mpmd_ranks_reading_different_data_files_stop_with_one_line(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name in ("a", "b"):  # same shape and labels, other features: only the first rows' hash tells them apart
        paths.append(tmp_path / f"{name}.npz")
        np.savez(paths[-1], x=rng.standard_normal((60, 5)).astype(np.float32), y=np.arange(60) % 2)
    p = mpmd(tmp_path, ["data.name=npz", f"data.path={paths[0]}"], ["data.name=npz", f"data.path={paths[1]}"],
             config="conf/xor.yaml")
    assert p.returncode == 2, p.stderr[-3000:]
    assert len(errors(p)) == 1 and "rank(s) 1 differ from rank 0 on the data's first rows" in errors(p)[0], p.stderr
    assert "every worker must read the same data" in errors(p)[0]


def start_local(out, *sets):
    argv = [sys.executable, ROOT / "launchers/local.py", "conf/digits.yaml", "--out", out]
    argv += [a for s in sets for a in ("--set", s)]
    return subprocess.Popen([str(a) for a in argv], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_runs_started_on_one_out_half_a_second_apart_one_fails_at_once(tmp_path):
    out = tmp_path / "o"
    sets = ["train.epochs=40", "train.log_every=5", "checkpoint.every_steps=20"]
    first = start_local(out, *sets)
    time.sleep(0.5)
    start = time.monotonic()
    second = start_local(out, *sets)
    second_out, second_err = second.communicate(timeout=120)
    refused_in = time.monotonic() - start
    first_out, first_err = first.communicate(timeout=300)
    codes = sorted([first.returncode, second.returncode])
    assert codes == [0, 2], (first_err[-2000:], second_err[-2000:])
    loser_err = second_err if second.returncode == 2 else first_err
    lines = [x for x in loser_err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: --out {out} is in use by another run (pid "), lines
    if second.returncode == 2:
        assert refused_in < 15, f"refused after {refused_in:.1f} s"
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    assert steps == list(range(5, 5 * len(steps) + 1, 5)), "one run's lines, none interleaved"
    assert json.loads((out / "summary.json").read_text())["epochs"] == 40


def test_a_run_holding_out_refuses_mpi_and_dist_train_mpi_at_once(tmp_path):
    out = tmp_path / "o"
    holder = start_local(out, "train.epochs=400", "train.log_every=5")
    try:
        deadline = time.monotonic() + 60
        while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        p = mpirun(2, "conf/digits.yaml", out, "train.epochs=1", timeout=60)
        assert p.returncode == 2 and len(errors(p)) == 1 and "is in use by another run" in errors(p)[0], p.stderr
        w = run([BIN / "dist-train", "mpi", "-n", "2", "conf/digits.yaml", "--out", out], timeout=60)
        assert w.returncode == 2 and w.stderr.strip().startswith(f"error: --out {out} is in use"), w.stderr
        assert "mpirun" not in w.stderr, "refused before any rank starts"
        assert holder.poll() is None, "the run that holds --out goes on"
    finally:
        holder.kill()
        holder.communicate()
