"""Bad input anywhere a user can give it: one line, exit code 2, no traceback, nothing
written; and a property test over random config mutations: a valid run or one clean
line, never a traceback or a hang."""

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dist_train import cli, config, data
from dist_train.train import validate
from dist_train.errors import UserError

from ..helpers import ROOT, local

BASE = {"seed": 0, "model": {"name": "mlp", "hidden": [8]}, "data": {"name": "xor", "eval_fraction": 0},
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.1, "log_every": 0}}
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 2000), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=12), st.lists(st.integers(-3, 5), max_size=3), st.dictionaries(st.text(max_size=4),
                                                                                                   st.integers(), max_size=2))
KEYS = st.sampled_from([k.name for k in config.KEYS] + ["train.lr_", "trian.lr", "model.hiden", "x", "data.nme"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=4))
def test_random_config_mutations_give_a_valid_config_or_one_clean_line(mutations):
    flat = dict(config.flat_items(BASE))
    for key, value in mutations:
        flat[key] = value
    try:
        cfg = config.build(flat)
        ds = data.load(cfg)
        validate.check(cfg, ds)
    except UserError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "Traceback" not in msg


@settings(max_examples=12, deadline=None)
@given(st.sampled_from(["train.lr=-1", "train.epochs=0", "model.hidden=[0]", "data.sampling=x", "train.loss=hinge",
                        "model.target=os:getcwd", "model.kwargs=3", "seed=-1", "data.eval_fraction=0.99"]))
def test_mutations_through_the_command_line(tmp_path_factory, setting):
    out = tmp_path_factory.mktemp("bad") / "out"
    with pytest.raises(SystemExit) as e:
        cli.main(["local", str(ROOT / "conf/xor.yaml"), "--out", str(out), "--set", setting])
    assert e.value.code == 2 and not out.exists()


def test_corrupt_parquet(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1" + b"\x00" * 100)
    p = local("conf/xor.yaml", tmp_path / "o", "data.name=parquet", f"data.path={bad}")
    assert p.returncode == 2 and "not a readable Parquet file" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_mismatched_feature_width_in_a_file(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((8, 3), np.float32), y=np.zeros(8, np.int64))
    p = local("conf/xor.yaml", tmp_path / "o", "data.name=npz", f"data.path={tmp_path}/d.npz",
              "model.target=tests.faulty:model", "model.kwargs={inputs: 2, outputs: 2}")
    assert p.returncode == 2 and "do not fit the model" in p.stderr


def test_checkpoint_from_a_different_model_is_refused(tmp_path):
    out = tmp_path / "o"
    assert local("conf/xor.yaml", out, "train.epochs=3").returncode == 0
    p = local("conf/xor.yaml", out, "train.epochs=6", "model.hidden=[16]", resume=True)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error: the checkpoint does not fit this model/optimizer: size mismatch for ")
    assert "torch.Size([16, 2])" in p.stderr and not p.stderr.strip().endswith(":")
    assert len(p.stderr.strip().splitlines()) == 1


def test_models_and_checkpoints_load_with_weights_only(tmp_path):
    out = tmp_path / "o"
    assert local("conf/xor.yaml", out, "train.epochs=3").returncode == 0
    torch.load(out / "model.pt", weights_only=True)
    for ckpt in (out / "checkpoints").glob("*.pt"):
        torch.load(ckpt, weights_only=True)
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
