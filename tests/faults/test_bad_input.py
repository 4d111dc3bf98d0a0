"""Bad input anywhere a user can give it: one line, exit code 2, no traceback, nothing
written; and a property test over random config mutations: a valid run or one clean
line, never a traceback or a hang."""

import json
from pathlib import Path

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


@pytest.mark.parametrize("mode", ["built", "training"])
def test_a_model_that_calls_sys_exit_0_fails_the_run_with_one_line(mode, tmp_path):
    """Not rc 0 with no outputs: a user's sys.exit(0) is a failure, said as one."""
    model = ["model.target=tests.faulty:exits_when_built"] if mode == "built" else \
        ["model.target=tests.faulty:model", "model.kwargs={mode: exit, fail_rank: 0, fail_step: 3}"]
    p = local("conf/digits.yaml", tmp_path / "o", *model, "train.log_every=0")
    assert p.returncode == 1, p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert line == ("error: exited (sys.exit(0)) before training began: the model, dataset or loss code called it; "
                    "nothing was trained" if mode == "built" else "error: rank 0 exited at step 3")
    assert not (tmp_path / "o" / "model.pt").exists()


LABELS = {"ints": lambda n, r: r.integers(0, 3, n), "bools": lambda n, r: r.integers(0, 2, n) > 0,
          "strings": lambda n, r: np.array(["cat", "dog", "emu"])[r.integers(0, 3, n)],
          "floats": lambda n, r: r.normal(size=n), "nan": lambda n, r: np.where(np.arange(n) == 1, np.nan, 1.0),
          "huge": lambda n, r: np.full(n, 10 ** 9), "1e30": lambda n, r: np.full(n, 1e30),
          "negative": lambda n, r: np.full(n, -2), "0-d": lambda n, r: np.array(3),
          "2-d": lambda n, r: r.normal(size=(n, 2)), "objects": lambda n, r: np.array([None] * n, dtype=object),
          "bytes": lambda n, r: np.array([b"a", b"b"] * (n // 2))}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(LABELS)), st.sampled_from(["float32", "float64", "int8", "U1", "bool"]),
       st.lists(st.integers(0, 5), min_size=0, max_size=3), st.sampled_from(["npz", "parquet"]),
       st.sampled_from(["cross_entropy", "mse", "bce"]))
def test_random_data_files_give_a_valid_dataset_or_one_clean_line(tmp_path_factory, labels, dtype, shape, kind,
                                                                   loss):
    r = np.random.default_rng(0)
    n = 8
    x = r.normal(size=(n, *shape)).astype(dtype) if dtype != "U1" else np.full((n, *shape), "a")
    y = LABELS[labels](n, r)
    path = tmp_path_factory.mktemp("data") / f"d.{kind}"
    if kind == "npz":
        np.savez(path, x=x, y=y)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            cols = {"f": pa.array([list(row.reshape(-1)) for row in x]) if x.ndim > 1 else pa.array(list(x)),
                    "label": pa.array(list(y)) if np.ndim(y) == 1 else pa.array([list(v) for v in np.atleast_2d(y)])}
            pq.write_table(pa.table(cols), path)
        except (pa.ArrowException, ValueError, TypeError):
            return  # not a table Arrow can write: no file a user could hand us
    flat = {**dict(config.flat_items(BASE)), "data.name": kind, "data.path": str(path), "train.loss": loss}
    try:
        cfg = config.build(flat)
        validate.check(cfg, data.load(cfg))
    except UserError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "Traceback" not in msg


@pytest.mark.parametrize("labels,line", [
    ("nan", "the label of row 1 is NaN or Inf"),
    ("huge", "label 1000000000 is too large to be a class id"),
    ("1e30", "got float labels in [1e+30, 1e+30]"),
    ("0-d", "labels must hold one label per row"),
    ("floats", "train.loss cross_entropy needs integer class labels, got float labels in"),
    ("negative", "label -2 is negative")])
def test_labels_that_are_not_class_ids_say_what_they_are(labels, line, tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((8, 3), np.float32), y=LABELS[labels](8, np.random.default_rng(0)))
    cfg = config.build({**dict(config.flat_items(BASE)), "data.name": "npz", "data.path": str(tmp_path / "d.npz")})
    with pytest.raises(UserError, match=None) as e:
        validate.check(cfg, data.load(cfg))
    assert line in str(e.value) and "\n" not in str(e.value)


def test_string_and_boolean_labels_are_classes_and_string_names_reach_predict(tmp_path, capsys):
    r = np.random.default_rng(0)
    x = r.normal(size=(90, 4)).astype(np.float32)
    names = np.array(["cat", "dog", "emu"])[(x[:, 0] > 0).astype(int) + (x[:, 1] > 0).astype(int)]
    np.savez(tmp_path / "d.npz", x=x, y=names)
    out = tmp_path / "run"
    p = local("conf/xor.yaml", out, "data.name=npz", f"data.path={tmp_path / 'd.npz'}", "train.epochs=30",
              "model.hidden=[16]", "train.batch_size=16")
    assert p.returncode == 0, p.stderr
    assert torch.load(out / "model.pt", weights_only=True)["config"]["data"]["label_map"] == ["cat", "dog", "emu"]
    with pytest.raises(SystemExit) as e:  # a map that misses a label: one line
        cli.main(["local", str(ROOT / "conf/xor.yaml"), "--out", str(tmp_path / "m"), "--set", "data.name=npz",
                  "--set", f"data.path={tmp_path / 'd.npz'}", "--set", "data.label_map=[cat, dog]"])
    assert e.value.code == 2
    assert cli.main(["predict", str(out), str(tmp_path / "d.npz"), "--out", str(tmp_path / "p.csv"),
                     "--probabilities"]) == 0
    import csv

    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert set(rows[0]) == {"row", "prediction", "p_cat", "p_dog", "p_emu"} and len(rows) == 90
    assert sum(row["prediction"] == name for row, name in zip(rows, names)) > 70
    assert abs(sum(float(rows[0][f"p_{c}"]) for c in ("cat", "dog", "emu")) - 1) < 1e-5
    capsys.readouterr()
    for bad, line in ((tmp_path, "is a directory"), (tmp_path / "p.txt", "written as .parquet or .csv"),
                      (Path("/proc/p.parquet"), "cannot write /proc/p.parquet"), (tmp_path / "no" / "p.csv", "does not exist")):
        with pytest.raises(SystemExit) as e:
            cli.main(["predict", str(out), str(tmp_path / "d.npz"), "--out", str(bad)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and line in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.rglob("*.tmp")) and not list(Path("/proc").glob(".p.parquet*"))
    np.savez(tmp_path / "b.npz", x=x, y=x[:, 0] > 0)  # booleans: classes 0 and 1
    cfg = config.build({**dict(config.flat_items(BASE)), "data.name": "npz", "data.path": str(tmp_path / "b.npz")})
    assert validate.check(cfg, data.load(cfg)) == 2


@pytest.mark.parametrize("setting,line", [
    ("seed=18446744073709551616", "seed: must be in [0, 2**63)"),
    ("model.hidden=[100000000000]", "model.hidden: the model has"),
    ("model.outputs=1000000000000", "model.outputs: the model has"),
    ("train.lr=0.1 #x", "'#' starts a YAML comment"),
])
def test_sizes_and_settings_that_cannot_be_are_refused_at_config_time(setting, line, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["local", str(ROOT / "conf/digits.yaml"), "--out", str(tmp_path / "o"), "--set", setting])
    err = capsys.readouterr().err
    assert e.value.code == 2 and line in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_synthetic_data_too_large_for_memory_is_refused():
    with pytest.raises(UserError, match="data.size: 1000000000 samples of shape"):
        config.build({"data.name": "synthetic", "data.size": 10 ** 9})


def test_yaml_means_what_a_user_means(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lr: 1e-3\n  loss: cross_entropy\ndata:\n  name: npz\n"
                                     "  path: 2024\n  label_column: on\n")
    (tmp_path / "2024").write_bytes(b"")
    import os

    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        cfg = config.load("c.yaml", ["log.tensorboard=false"])
    finally:
        os.chdir(here)
    assert cfg.train.lr == 1e-3 and cfg.data.path == "2024" and cfg.data.label_column == "on"
    assert config.parse_override("data.path=my #1.npz") == ("data.path", "my #1.npz")
    with pytest.raises(UserError, match="is a directory"):
        config.load(tmp_path)


@pytest.mark.parametrize("where,line", [("/proc/dist-train-run", "is not writable"),
                                        ("FILE/run", "is not a directory")])
def test_an_out_that_cannot_be_written_is_refused_before_any_worker_starts(where, line, tmp_path, capsys):
    (tmp_path / "FILE").write_text("")
    out = where.replace("FILE", str(tmp_path / "FILE"))
    for command in (["local"], ["mpi", "-n", "2"]):
        with pytest.raises(SystemExit) as e:
            cli.main([*command, str(ROOT / "conf/xor.yaml"), "--out", out])
        err = capsys.readouterr().err
        assert e.value.code == 2 and line in err and len(err.strip().splitlines()) == 1, err


def test_a_full_filesystem_is_refused_before_training(tmp_path, monkeypatch):
    from dist_train.train import outputs

    monkeypatch.setattr(outputs, "MIN_FREE_BYTES", 1 << 62)  # more than any disk has free
    with pytest.raises(UserError, match="MiB free; free some space first"):
        outputs.prepare_out_dir(tmp_path / "run", resume=False)


def test_a_checkpoint_that_does_not_fit_on_disk_is_one_line_and_the_previous_stays(tmp_path):
    """A real write failure (a file size limit, as a full disk or a quota fails it)."""
    import resource
    import signal
    import subprocess
    import sys

    from ..helpers import env

    out = tmp_path / "run"
    sets = ["--set", "checkpoint.every_steps=5", "--set", "train.log_every=0"]
    assert local("conf/digits.yaml", out, "train.epochs=2", "checkpoint.every_steps=5").returncode == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000))  # metrics fit, a checkpoint (~100 KB) does not

    p = subprocess.run([sys.executable, ROOT / "launchers/local.py", "conf/digits.yaml", "--out", out, *sets,
                        "--set", "train.epochs=4", "--resume"], preexec_fn=limited, capture_output=True, text=True,
                       cwd=ROOT, env=env(), timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == ["error: File too large writing checkpoint step 50 in "
                                             f"{out / 'checkpoints'}; the previous checkpoint is intact (free "
                                             f"space, then --resume)"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert not list(out.rglob("*.tmp"))


def test_byte_string_labels_and_quoted_hashes_and_a_parquet_with_string_labels_to_predict(tmp_path):
    np.savez(tmp_path / "b.npz", x=np.zeros((4, 2), np.float32), y=np.array([b"cat", b"dog", b"cat", b"dog"]))
    assert data.load_npz(tmp_path / "b.npz").label_names == ("cat", "dog")
    assert config.parse_override('train.optimizer="a #b"') == ("train.optimizer", "a #b")
    import pyarrow as pa
    import pyarrow.parquet as pq

    r = np.random.default_rng(0)
    x = r.normal(size=(40, 3))
    pq.write_table(pa.table({"f": [list(v) for v in x], "label": ["a" if v[0] > 0 else "b" for v in x]}),
                   tmp_path / "s.parquet")
    out = tmp_path / "run"
    assert local("conf/xor.yaml", out, "data.name=parquet", f"data.path={tmp_path / 's.parquet'}",
                 "train.epochs=3").returncode == 0
    assert cli.main(["predict", str(out), str(tmp_path / "s.parquet"), "--out", str(tmp_path / "p.parquet")]) == 0
    assert set(pq.read_table(tmp_path / "p.parquet").column("prediction").to_pylist()) <= {"a", "b"}


def test_a_failed_save_of_a_step_already_saved_keeps_that_checkpoint(tmp_path, monkeypatch):
    from dist_train.train import checkpoint

    state = {"w": torch.ones(3)}
    checkpoint.save(tmp_path, 5, state, keep=3)
    good = (tmp_path / "step-00000005.pt").read_bytes()

    def no_space(path, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "atomic_save", no_space)
    with pytest.raises(UserError, match="No space left on device writing checkpoint step 5"):
        checkpoint.save(tmp_path, 5, state, keep=3)  # finish() saving the step advance() saved
    assert (tmp_path / "step-00000005.pt").read_bytes() == good
    assert checkpoint.read_verified(tmp_path / "step-00000005.pt")["w"].tolist() == [1.0, 1.0, 1.0]
