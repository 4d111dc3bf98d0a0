"""Bad input is refused before training: exit code 2, one line naming the key, no traceback."""

import subprocess
import sys

import numpy as np
import pytest

from dist_train import cli, config
from dist_train.errors import ConfigError

from .helpers import ROOT


def refuse(argv, capsys, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli.main(["local", *argv[:1], "--out", str(out), *argv[1:]])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert not out.exists(), "nothing may be written for bad input"
    return err


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_unknown_key_names_the_nearest_valid_one(tmp_path, capsys):
    err = refuse([write(tmp_path, "train: {lerning_rate: 0.1, lr: 0.1}\n")], capsys, tmp_path)
    assert "train.lerning_rate" in err and "unknown key" in err
    err = refuse(["conf/xor.yaml", "--set", "train.epoch=3"], capsys, tmp_path)
    assert "did you mean train.epochs?" in err
    err = refuse(["conf/xor.yaml", "--set", "trian.lr=3"], capsys, tmp_path)
    assert "did you mean train.lr?" in err


def test_unknown_section(tmp_path, capsys):
    err = refuse([write(tmp_path, "trainer: {lr: 0.1}\n")], capsys, tmp_path)
    assert "trainer" in err and "did you mean train?" in err


@pytest.mark.parametrize("setting,words", [
    ("train.lr=fast", ["train.lr", "must be a number", "'fast'"]),
    ("train.epochs=2.5", ["train.epochs", "must be an integer"]),
    ("train.shuffle=3", ["train.shuffle", "true or false"]),
    ("model.hidden=[64, -1]", ["model.hidden", "positive integers"]),
    ("train.lr=-0.1", ["train.lr", "must be > 0"]),
    ("train.batch_size=0", ["train.batch_size", "must be > 0"]),
    ("train.momentum=1.5", ["train.momentum", "[0, 1)"]),
    ("train.optimizer=adamx", ["train.optimizer", "unknown optimizer 'adamx'", "did you mean adam"]),
    ("train.loss=hinge", ["train.loss", "cross_entropy, mse, bce or 'package.module:fn'"]),
    ("train.metrics=[accuracy,top0]", ["train.metrics", "unknown metric 'top0'"]),
    ("data.sampling=random", ["data.sampling", "shard, global"]),
    ("data.eval_fraction=1", ["data.eval_fraction", "[0, 1)"]),
    ("device=gpu", ["device", "auto, cpu, cuda"]),
    ("model.target=nocolon", ["model.target", "package.module:factory"]),
    ("train.lr=.nan", ["train.lr", "finite"]),
])
def test_wrong_type_or_impossible_value(setting, words, capsys, tmp_path):
    err = refuse(["conf/xor.yaml", "--set", setting], capsys, tmp_path)
    for w in words:
        assert w in err, err


def test_malformed_yaml_and_missing_config(tmp_path, capsys):
    err = refuse([write(tmp_path, "train: {lr: 0.1\nseed: [\n")], capsys, tmp_path)
    assert "malformed YAML" in err and "line" in err
    err = refuse([str(tmp_path / "nope.yaml")], capsys, tmp_path)
    assert "does not exist" in err
    err = refuse([write(tmp_path, "- a\n- b\n")], capsys, tmp_path)
    assert "mapping" in err


def test_missing_data_file(tmp_path, capsys):
    err = refuse(["conf/xor.yaml", "--set", "data.name=npz", "--set", f"data.path={tmp_path}/x.npz"],
                 capsys, tmp_path)
    assert "data.path" in err and "does not exist" in err
    err = refuse(["conf/xor.yaml", "--set", "data.name=parquet"], capsys, tmp_path)
    assert "data.path" in err and "required" in err


def test_unreadable_data_file(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    err = refuse(["conf/xor.yaml", "--set", "data.name=npz", "--set", f"data.path={bad}"], capsys, tmp_path)
    assert "not a readable .npz" in err


def test_label_out_of_range_for_the_model(tmp_path, capsys):
    err = refuse(["conf/digits.yaml", "--set", "model.outputs=5"], capsys, tmp_path)
    assert "model.outputs" in err and "label 9" in err and "5 outputs" in err


def test_input_width_that_does_not_match_the_model(tmp_path, capsys):
    err = refuse(["conf/digits.yaml", "--set", "model.target=tests.faulty:model",
                  "--set", "model.kwargs={inputs: 10}"], capsys, tmp_path)
    assert "do not fit the model" in err and "[1, 8, 8]" in err


def test_bad_model_target(tmp_path, capsys):
    err = refuse(["conf/digits.yaml", "--set", "model.target=no.such.module:f"], capsys, tmp_path)
    assert "model.target" in err and "cannot import" in err
    err = refuse(["conf/digits.yaml", "--set", "model.target=tests.faulty:not_a_module"], capsys, tmp_path)
    assert "not a torch.nn.Module" in err


def test_nan_in_data_is_reported_with_its_row(tmp_path, capsys):
    x = np.zeros((6, 3), dtype=np.float32)
    x[4, 1] = np.nan
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(6, dtype=np.int64))
    err = refuse(["conf/xor.yaml", "--set", "data.name=npz", "--set", f"data.path={tmp_path}/d.npz"],
                 capsys, tmp_path)
    assert "row 4" in err and "NaN" in err


def test_batch_smaller_than_world_size():
    cfg = config.load("conf/xor.yaml", ["train.batch_size=2"])
    with pytest.raises(ConfigError, match="train.batch_size.*smaller than the world size 3"):
        config.check_world(cfg, 3)


def test_overrides_are_typed():
    cfg = config.load("conf/digits.yaml", ["train.lr=0.05", "model.hidden=[32, 16]", "train.shuffle=false",
                                           "train.epochs=3", "train.target_loss=0.5", "train.max_steps=null"])
    assert cfg.train.lr == 0.05 and cfg.model.hidden == [32, 16] and cfg.train.shuffle is False
    assert cfg.train.epochs == 3 and cfg.train.target_loss == 0.5 and cfg.train.max_steps is None
    assert config.load(None, ["train.lr=1"]).train.lr == 1.0  # an int where a float goes is fine


def test_every_key_has_a_type_default_and_comment():
    for key in config.KEYS:
        assert key.help and key.type
        if not key.optional:
            assert key.default is not None
    assert "train.batch_size" in config.describe()


def test_existing_run_is_not_overwritten_without_resume(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step-00000001.pt").write_bytes(b"x")
    with pytest.raises(SystemExit) as e:
        cli.main(["local", "conf/xor.yaml", "--out", str(out)])
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err


def test_real_process_exit_code_and_single_line():
    p = subprocess.run([sys.executable, str(ROOT / "launchers/local.py"), "conf/xor.yaml", "--set", "train.lr=-1"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 2
    assert p.stderr.strip() == "error: config error: train.lr: must be > 0, got -1.0"


def test_mlflow_without_the_package_is_refused_at_config_time(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"log.mlflow: needs the mlflow package: pip install 'dist-train\[mlflow\]'"):
        config.load(None, ["log.mlflow=true"])
    assert config.load(None, ["log.mlflow=false"]).log.mlflow is False
