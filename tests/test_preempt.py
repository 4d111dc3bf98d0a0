"""The stop request (preempt.py) and its place in the failure table, in one process."""

import os
import signal

import pytest

from dist_train import failures, preempt
from dist_train.errors import Preempted
from dist_train.launchers.spark.driver import TrainingFailed


def test_the_stop_file_carries_the_signal_and_a_new_run_clears_it(tmp_path):
    assert preempt.read(tmp_path / preempt.STOP_FILE) == 0
    preempt.ask(tmp_path, signal.SIGUSR1)
    assert preempt.read(tmp_path / preempt.STOP_FILE) == signal.SIGUSR1
    assert os.listdir(tmp_path) == [preempt.STOP_FILE]  # written whole: no temporary file left
    preempt.ask(tmp_path / "gone", signal.SIGTERM)  # an --out that went away: nothing to stop, no error
    preempt.clear(tmp_path)
    assert not (tmp_path / preempt.STOP_FILE).exists()


def test_a_signal_is_recorded_and_a_second_one_interrupts():
    with preempt.catching():
        assert preempt.asked() == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert preempt.asked() == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and preempt.asked() == 0  # handlers restored


def test_the_stop_file_is_looked_for_while_training(tmp_path, monkeypatch):
    monkeypatch.setattr(preempt, "POLL_S", 0.0)
    with preempt.catching(tmp_path / preempt.STOP_FILE):
        assert preempt.asked() == 0
        preempt.ask(tmp_path, signal.SIGINT)
        assert preempt.asked() == signal.SIGINT


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_stop_exits_128_plus_the_signal_everywhere_with_one_line(signum, capsys):
    e = Preempted(signum, 7, "checkpoint x written; continue with --resume", rank=1)
    assert failures.handle(e, rank=0, world=2, abort=lambda code: pytest.fail("a stop aborts no one")) == 128 + signum
    assert capsys.readouterr().err == f"[dist-train] stopped by {signum.name} (asked of rank 1) at step 7: " \
                                      f"checkpoint x written; continue with --resume\n"
    assert failures.handle(e, rank=1, world=2, abort=lambda code: None) == 128 + signum
    assert capsys.readouterr().err == ""  # said once, by rank 0
    spark = TrainingFailed(f"[rank 0] Preempted: {e}")  # what the Spark driver gets of it
    assert spark.preempted and spark.exit_code == 128 + signum
    assert not TrainingFailed("[rank 1] RuntimeError: boom").preempted
