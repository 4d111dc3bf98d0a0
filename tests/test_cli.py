"""The dist-train console script: flags people forget, and one-line errors."""

import json

import pytest

from dist_train import cli
from dist_train.errors import UserError
from dist_train.launchers import args, mpi

from .helpers import BIN, ROOT, ok, run


def test_mpirun_command_adds_the_flags_people_forget():
    cmd = mpi.command(4, ["c.yaml"], [], cores=2, is_root=True)
    assert cmd[1:5] == ["-n", "4", "--bind-to", "none"]
    assert "--oversubscribe" in cmd and "--allow-run-as-root" in cmd
    cmd = mpi.command(2, ["c.yaml"], ["--host", "a,b"], cores=8, is_root=False)
    assert "--oversubscribe" not in cmd and "--allow-run-as-root" not in cmd
    assert cmd[cmd.index("--host") + 1] == "a,b" and cmd[-1] == "c.yaml"


def test_active_environment_mpirun_is_found_first():
    if (BIN / "mpirun").exists():
        assert args.find_executable("mpirun") == str(BIN / "mpirun")


def test_missing_mpirun_is_one_line(monkeypatch):
    monkeypatch.setattr(mpi, "find_executable", lambda name: None)
    with pytest.raises(UserError, match="no mpirun found: install one with"):
        mpi.command(2, [], [])


def test_unknown_subcommand_and_bad_n(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "conf/xor.yaml"])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        cli.main(["mpi", "-n", "0", "conf/xor.yaml"])
    assert e.value.code == 2 and "-n must be at least 1" in capsys.readouterr().err


def test_config_reference_lists_every_key(capsys):
    assert cli.main(["config"]) == 0
    assert "`train.target_loss`" in capsys.readouterr().out


def test_dist_train_mpi_runs_and_prints_its_command(tmp_path):
    p = ok(run([BIN / "dist-train", "mpi", "-n", "3", "conf/xor.yaml", "--out", tmp_path / "x",
                "--set", "train.epochs=300"]))
    assert "+ " in p.stderr and "--bind-to none" in p.stderr and "-m dist_train.launchers.mpi" in p.stderr
    assert "--mca btl self,sm" in p.stderr  # one host: shared memory only, no TCP port of the ranks
    s = json.loads((tmp_path / "x" / "summary.json").read_text())
    assert s["world_size"] == 3 and s["eval"]["accuracy"] == 1.0
    # mpirun gives rank 0 a pty, but our output is a pipe: plain lines, no progress bar
    assert "\r" not in p.stdout and "step    100  epoch" in p.stdout, p.stdout[-500:]


def test_dist_train_mpi_refuses_bad_input_before_starting_ranks(tmp_path):
    p = run([BIN / "dist-train", "mpi", "-n", "2", "conf/xor.yaml", "--set", "train.lr=0"])
    assert p.returncode == 2 and p.stderr.strip() == "error: config error: train.lr: must be > 0, got 0.0"


def test_readme_config_table_is_current():
    from dist_train import config

    from .helpers import ROOT

    assert config.describe() in (ROOT / "README.md").read_text(), "regenerate the README's table: dist-train config"


def test_config_prints_the_merged_validated_config(capsys):
    import yaml


    assert cli.main(["config", str(ROOT / "conf/digits.yaml"), "--set", "train.lr=1e-3", "--set",
                     "model.hidden=[256, 128]"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 1e-3 and printed["model"]["hidden"] == [256, 128]
    assert printed["train"]["epochs"] == 30  # from the file, the rest from the defaults
    with pytest.raises(SystemExit) as e:
        cli.main(["config", str(ROOT / "conf/digits.yaml"), "--set", "train.lr=-1"])
    assert e.value.code == 2 and capsys.readouterr().err.strip() == "error: config error: train.lr: must be > 0, got -1.0"


def test_the_wrappers_command_line_imports_no_torch():
    """`dist-train spark` only starts spark-submit: torch's second of imports is the driver's."""
    import subprocess
    import sys

    code = "import sys, dist_train.cli; print('torch' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert p.stdout.strip() == "False"
    # nor does checking the config it is given, as `dist-train spark` does before spark-submit starts
    code = ("import sys; from dist_train import config; "
            f"config.load({str(ROOT / 'conf/digits.yaml')!r}, ['train.optimizer=AdamW', 'train.momentum=0']); print('torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert p.stdout.strip() == "False"


def test_the_optimizers_checked_without_torch_are_torchs():
    from dist_train import config

    assert set(config.ALWAYS_OPTIMIZERS) <= set(config.optimizer_names())
    assert config.load(ROOT / "conf/digits.yaml", ["train.optimizer=Muon"]).train.optimizer == "Muon"  # looked up in torch
