"""Using a trained model afterwards: eval and predict reproduce summary.json; info reports."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from dist_train import cli, data
from dist_train.data import sharding

from .helpers import ROOT
from dist_train.launchers import local


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("use") / "digits"
    assert local.main([str(ROOT / "conf/digits.yaml"), "--out", str(out), "--set", "train.epochs=5",
                       "--set", "model.hidden=[32]"]) == 0
    return out


def test_eval_reproduces_the_summary(run, capsys):
    assert cli.main(["eval", str(run)]) == 0
    got = json.loads(capsys.readouterr().out)
    want = json.loads((run / "summary.json").read_text())["eval"]
    assert got["samples"] == want["samples"] and got["accuracy"] == pytest.approx(want["accuracy"])
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)


def test_predict_reproduces_the_held_out_accuracy(run, tmp_path, capsys):
    ds = data.digits()
    _, held = sharding.split_rows(0, len(ds), 0, 0.2)
    np.savez(tmp_path / "held.npz", x=ds.x[held], y=ds.y[held])
    assert cli.main(["predict", str(run), str(tmp_path / "held.npz"), "--out", str(tmp_path / "p.parquet")]) == 0
    pred = pq.read_table(tmp_path / "p.parquet").column("prediction").to_numpy()
    accuracy = float((pred == ds.y[held]).mean())
    assert accuracy == pytest.approx(json.loads((run / "summary.json").read_text())["eval"]["accuracy"])
    assert cli.main(["eval", str(run), "--data", str(tmp_path / "held.npz")]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(accuracy)


def test_predict_refuses_inputs_that_do_not_fit(run, tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 5), np.float32))
    with pytest.raises(SystemExit) as e:
        cli.main(["predict", str(run), str(tmp_path / "bad.npz"), "--out", str(tmp_path / "p.parquet")])
    assert e.value.code == 2 and "do not fit" in capsys.readouterr().err
    assert not (tmp_path / "p.parquet").exists()


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("use") / "cnn"
    assert local.main([str(ROOT / "conf/digits_cnn.yaml"), "--out", str(out), "--set", "train.epochs=1"]) == 0
    return out


@pytest.mark.parametrize("which", ["run", "cnn_run"])
def test_exported_models_compute_what_the_run_computes(which, request, tmp_path, capsys):
    """TorchScript (torch.jit.load) and ONNX (onnx's reference evaluator) give the trained
    model's outputs, for a batch size other than the one exported with."""
    import torch
    from onnx import load as load_onnx
    from onnx.reference import ReferenceEvaluator

    from dist_train.use import load_run

    run = request.getfixturevalue(which)
    _, model, meta = load_run(run)
    x = torch.from_numpy(data.digits().x[:7]).reshape(7, *meta["sample_shape"])
    want = model(x).detach().numpy()
    assert cli.main(["export", str(run), "--format", "torchscript"]) == 0
    scripted = torch.jit.load(str(run / "model.ts.pt"))
    np.testing.assert_allclose(scripted(x).detach().numpy(), want, rtol=1e-5, atol=1e-6)
    assert cli.main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    got = ReferenceEvaluator(load_onnx(str(tmp_path / "m.onnx"))).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert "wrote" in capsys.readouterr().err
    assert not list(run.glob(".*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_export_of_a_directory_that_is_not_a_run_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["export", str(tmp_path), "--format", "onnx"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error:")
    assert not list(tmp_path.iterdir())


def test_info_names_versions_and_tools(capsys):
    assert cli.main(["info"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["torch"].startswith("2.") and got["python"].count(".") == 2
    assert "cores_available" in got and "mpi_implementation" in got and "java" in got


def test_plot_of_two_runs_is_a_real_png(run, tmp_path):
    other = tmp_path / "other"
    assert local.main([str(ROOT / "conf/digits.yaml"), "--out", str(other), "--set", "train.epochs=3",
                       "--set", "model.hidden=[16]", "--set", "train.log_every=5"]) == 0
    assert cli.main(["plot", str(run), str(other), "--out", str(tmp_path / "p.png")]) == 0
    png = (tmp_path / "p.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    from matplotlib import image

    pixels = image.imread(tmp_path / "p.png")
    assert pixels.shape[0] == 800 and pixels.shape[1] == 1500 and pixels.std() > 0.05  # not blank


def test_plot_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["plot", str(tmp_path), "--out", str(tmp_path / "p.png")])
    assert e.value.code == 2 and "is not a run (no metrics.jsonl)" in capsys.readouterr().err


def test_metrics_hold_the_held_out_curve_and_wall_time_and_a_running_run_plots(tmp_path):
    out = tmp_path / "run"
    assert local.main([str(ROOT / "conf/digits.yaml"), "--out", str(out), "--set", "train.epochs=3",
                       "--set", "train.eval_every=10", "--set", "train.log_every=5"]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    held = [r for r in lines if r["kind"] == "eval"]
    assert [r["step"] for r in held] == [10, 20, 30, 40, 50, 60, 69]  # every 10 steps, and at the end
    assert held[-1]["accuracy"] == json.loads((out / "summary.json").read_text())["eval"]["accuracy"]
    assert all(r["wall"] >= r["time"] > 0 for r in lines if r["kind"] in ("step", "eval"))
    (out / "summary.json").unlink()  # as while the run still goes on
    assert cli.main(["plot", str(out), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def _run_with_stdout(tmp_path, name, stdout):
    import subprocess
    import sys

    from .helpers import env

    return subprocess.run([sys.executable, str(ROOT / "launchers/local.py"), "conf/digits.yaml", "--out",
                           str(tmp_path / name), "--set", "train.epochs=3", "--set", "train.log_every=20"],
                          stdout=stdout, stderr=subprocess.STDOUT, cwd=ROOT, env=env(), timeout=120)


def test_progress_bar_on_a_terminal_and_plain_lines_otherwise(tmp_path):
    import os
    import pty
    import subprocess

    plain = _run_with_stdout(tmp_path, "plain", subprocess.PIPE).stdout.decode()
    assert "\r" not in plain and "step     20  epoch   0  loss" in plain
    master, slave = pty.openpty()
    p = _run_with_stdout(tmp_path, "tty", slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    shown = b"".join(chunks).decode(errors="replace")
    assert p.returncode == 0
    assert "\r" in shown and "epoch 2: 100%" in shown and "23/23" in shown and "samples/s" in shown  # tqdm's bar
    assert "[dist-train] done" in shown


def test_outputs_honour_the_umask_and_predict_follows_no_planted_temporary_name(tmp_path):
    import os

    old = os.umask(0o002)  # a shared cluster group: group-writable
    try:
        out = tmp_path / "shared"
        assert local.main([str(ROOT / "conf/xor.yaml"), "--out", str(out), "--set", "train.epochs=5",
                           "--set", "checkpoint.every_steps=2"]) == 0
        victim = tmp_path / "victim"
        victim.write_text("keep")
        (tmp_path / ".p.parquet.tmp").symlink_to(victim)  # what an attacker could plant
        x = tmp_path / "x.npz"
        np.savez(x, x=np.zeros((3, 2), np.float32))
        assert cli.main(["predict", str(out), str(x), "--out", str(tmp_path / "p.parquet")]) == 0
    finally:
        os.umask(old)
    files = [out / "model.pt", out / "summary.json", out / "metrics.jsonl", *(out / "checkpoints").iterdir(),
             tmp_path / "p.parquet"]
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {"0o664"}
    assert victim.read_text() == "keep" and pq.read_table(tmp_path / "p.parquet").num_rows == 3
