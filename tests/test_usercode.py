"""Bring your own code, in one process: datasets, transforms' randomness, losses, metrics,
optimizers, factories, the pre-flight probe, BatchNorm buffers, dist_train.fit in a world
of one, and eval's --trust-code. (Under mpirun, torchrun and Spark: test_byo.py.)"""

import json
import random
import sys

import numpy as np
import pytest
import torch
from torch import nn

import dist_train
from dist_train import cli, config, data, models
from dist_train.errors import ConfigError, DataError
from dist_train.train import gradsync, losses, metrics, optim, validate

from .helpers import ROOT, run_threads

sys.path.insert(0, str(ROOT / "examples"))
import byo  # noqa: E402

BYO = ROOT / "examples/byo.yaml"


def cfg_of(*sets, path=BYO):
    return config.load(path, list(sets))


# ---------------------------------------------------------------- datasets and their randomness


def test_a_user_dataset_is_asked_only_for_items_and_collated():
    items = data.load(cfg_of())
    assert isinstance(items, data.Items) and items.n == 1797 and items.sample_shape == (1, 8, 8)
    xb, yb = items.batch(np.array([5, 0, 7]), torch.device("cpu"))
    assert xb.shape == (3, 1, 8, 8) and xb.dtype == torch.float32 and yb.tolist() == [int(byo.CroppedDigits().y[i])
                                                                                   for i in (5, 0, 7)]


def test_item_randomness_is_a_function_of_seed_epoch_and_row_and_leaves_the_global_generators_alone():
    items = data.load(cfg_of())
    rows = np.arange(40)
    torch.manual_seed(123)
    random.seed(5)
    before = torch.rand(3), random.random()
    torch.manual_seed(123)
    random.seed(5)
    a = items.fetch(rows, 3, True)[0]
    after = torch.rand(3), random.random()
    assert torch.equal(before[0], after[0]) and before[1] == after[1]  # the model's dropout does not see the data
    assert torch.equal(a, items.fetch(rows, 3, True)[0])  # again: the same crops
    assert not torch.equal(a, items.fetch(rows, 4, True)[0])  # another epoch: others
    assert torch.equal(items.fetch(rows[20:], 3, True)[0], a[20:])  # per row, not per batch position
    centre = items.fetch(rows, 3, False)[0]
    assert torch.equal(centre, items.fetch(rows, 9, False)[0])  # evaluation: no augmentation here


def test_data_workers_give_the_batches_the_worker_itself_would(tmp_path):
    plain, ahead = data.load(cfg_of("data.workers=0")), data.load(cfg_of("data.workers=2"))
    batches = [np.arange(i, i + 16) for i in range(0, 160, 16)]
    cpu = torch.device("cpu")
    for (n, x, y), (m, x2, y2) in zip(plain.feed(2, batches, cpu), ahead.feed(2, batches, cpu), strict=True):
        assert n == m == 16 and torch.equal(x, x2) and torch.equal(y, y2)


def test_a_batch_crosses_from_a_data_worker_as_arrays_and_comes_back_as_the_same_tensors():
    import pickle

    from dist_train.data import items as items_mod

    batch = ({"left": torch.arange(6.0).reshape(2, 3), "half": torch.ones(2, dtype=torch.bfloat16),
              "mine": np.arange(3), "n": 7, "sparse": torch.eye(2).to_sparse()},
             [torch.tensor([1, 2]), torch.tensor([True, False])])
    sent = pickle.loads(pickle.dumps(items_mod._as_arrays(batch)))
    back = items_mod._as_tensors(sent)
    assert isinstance(sent[0]["half"], torch.Tensor) and isinstance(sent[0]["mine"], np.ndarray)  # as they are
    assert back[0]["sparse"].is_sparse and torch.equal(back[0]["sparse"].to_dense(), torch.eye(2))
    assert back[0]["n"] == 7 and np.array_equal(back[0]["mine"], np.arange(3)) and isinstance(back[1], list)
    for got, want in [(back[0]["left"], batch[0]["left"]), (back[0]["half"], batch[0]["half"]),
                      (back[1][0], batch[1][0]), (back[1][1], batch[1][1])]:
        assert got.dtype == want.dtype and torch.equal(got, want)
    views = ("data.target=byo:TwoViews", "data.kwargs={}", "model.target=byo:TwoTower", "model.kwargs={}")
    plain, ahead = data.load(cfg_of(*views, "data.workers=0")), data.load(cfg_of(*views, "data.workers=1"))
    rows = [np.arange(0, 8), np.arange(8, 16)]
    for (_, x, y), (_, x2, y2) in zip(plain.feed(1, rows, torch.device("cpu")),
                                      ahead.feed(1, rows, torch.device("cpu")), strict=True):
        assert set(x) == set(x2) == {"left", "right"} and all(torch.equal(x[k], x2[k]) for k in x)
        assert torch.equal(y, y2)


def test_a_dict_of_inputs_reaches_the_model_as_keywords():
    cfg = cfg_of("data.target=byo:TwoViews", "data.kwargs={}", "model.target=byo:TwoTower", "model.kwargs={}")
    items = data.load(cfg)
    assert items.sample_shape == {"left": (1, 8, 4), "right": (1, 8, 4)}
    assert validate.check(cfg, items) == 10
    model = models.build(cfg, items.sample_shape, 10)
    xb, _ = items.batch(np.arange(3), torch.device("cpu"))
    assert models.apply(model, xb).shape == (3, 10)


def test_a_dataset_that_is_not_map_style_or_gives_bad_items_is_named():
    with pytest.raises(DataError, match="not a map-style dataset"):
        data.Items(iter([1, 2]), 0)
    items = data.Items([(1, 2, 3)], 0, name="triples")
    with pytest.raises(DataError, match=r"triples: an item must be \(inputs, target\)"):
        items.describe()


def test_a_data_factory_is_given_data_kwargs_and_a_dataset_object_comes_in_as_it_is():
    assert data.load(cfg_of("data.kwargs={pad: 2}")).dataset.pad == 2
    ds = byo.CroppedDigits(pad=3)
    assert data.load(cfg_of(), given=ds).dataset is ds
    assert data.load(cfg_of(), given=byo.CroppedDigits).dataset.pad == 1  # a class is a factory


# ---------------------------------------------------------------- losses and metrics


def test_a_user_loss_must_give_one_loss_per_sample():
    fine = losses.resolve("byo:smooth_cross_entropy")
    out, y = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    assert torch.allclose(fine.sum(out, y), nn.functional.cross_entropy(out, y, label_smoothing=0.1,
                                                                          reduction="sum"))
    mean = losses.resolve("x", given=lambda o, t: nn.functional.cross_entropy(o, t))
    with pytest.raises(ConfigError, match=r"one loss per sample \(shape \[4\]\), returned \[\]"):
        mean.sum(out, y)


def test_a_mean_reducing_loss_is_refused_before_training():
    cfg = cfg_of()
    with pytest.raises(ConfigError, match="train.loss: .*reduction='none'"):
        validate.check(cfg, data.load(cfg), loss=lambda o, t: nn.functional.cross_entropy(o, t))


def test_metrics_are_sums_and_counts():
    out = torch.tensor([[3.0, 1, 0, 2, -1, -2], [0, 1, 5, 2, 3, 4]])
    y = torch.tensor([3, 0])
    acc, top2, top5 = metrics.resolve(["accuracy", "top2", "top5"], losses.resolve("cross_entropy"))
    assert acc(out, y) == (0.0, 2.0) and top2(out, y) == (1.0, 2.0) and top5(out, y) == (1.0, 2.0)
    (mae,) = metrics.resolve(["mae"], losses.resolve("mse"))
    assert mae(torch.tensor([[1.0], [3.0]]), torch.tensor([2.0, 2.0])) == (2.0, 2.0)
    sys.modules["tests_metric_mod"] = type(sys)("tests_metric_mod")
    sys.modules["tests_metric_mod"].pair = lambda o, t: (torch.tensor(7.0), 3)
    (pair,) = metrics.resolve(["tests_metric_mod:pair"], losses.resolve("cross_entropy"))
    assert pair.name == "pair" and pair(out, y) == (7.0, 3.0)
    assert [m.name for m in metrics.resolve(None, losses.resolve("bce"))] == ["accuracy"]
    assert metrics.resolve(None, losses.resolve("mse")) == []


# ---------------------------------------------------------------- optimizers, factories, the probe


@pytest.mark.parametrize("name, cls", [("AdamW", torch.optim.AdamW), ("rmsprop", torch.optim.RMSprop),
                                       ("SGD", torch.optim.SGD), ("torch.optim:Adagrad", torch.optim.Adagrad)])
def test_any_torch_optimizer_by_name_in_any_case_or_by_import_path(name, cls):
    cfg = config.load(ROOT / "conf/xor.yaml", [f"train.optimizer={name}", "train.weight_decay=0.01"])
    opt = optim.make_optimizer(cfg, nn.Linear(2, 2))
    assert type(opt) is cls and opt.defaults["weight_decay"] == 0.01
    if cls in (torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad):
        assert opt.defaults["fused"] is True  # the fused CPU kernel kept


def test_optimizer_kwargs_reach_it_and_a_bad_one_is_named():
    cfg = config.load(ROOT / "conf/xor.yaml", ["train.optimizer=adamw", "train.optimizer_kwargs={betas: [0.8, 0.9]}"])
    assert tuple(optim.make_optimizer(cfg, nn.Linear(2, 2)).defaults["betas"]) == (0.8, 0.9)
    cfg = config.load(ROOT / "conf/xor.yaml", ["train.optimizer=adam", "train.optimizer_kwargs={nesterov: true}"])
    with pytest.raises(ConfigError, match="train.optimizer_kwargs: Adam.*nesterov"):
        optim.make_optimizer(cfg, nn.Linear(2, 2))


def test_a_model_factory_is_told_the_input_shape_and_outputs_where_it_takes_them():
    cfg = config.load(ROOT / "conf/digits.yaml")
    seen = {}

    def takes_all(**kw):
        seen.update(kw)
        return nn.Linear(64, 10)

    models.build(cfg, (1, 8, 8), 10, given=takes_all)
    assert seen == {"input_shape": (1, 8, 8), "outputs": 10}
    assert isinstance(models.build(cfg, (1, 8, 8), 10, given=lambda: nn.Flatten()), nn.Flatten)  # takes none


def test_the_probe_accepts_batchnorm_and_dropout_models():
    cfg = config.load(ROOT / "conf/digits.yaml", ["model.target=byo:bn_mlp"])
    assert validate.check(cfg, data.load(cfg)) == 10


def test_batchnorm_statistics_are_averaged_and_counters_are_rank_0s():
    def rank(comm):
        bn = nn.BatchNorm1d(3)
        bn.running_mean.fill_(float(comm.rank))
        bn.num_batches_tracked.fill_(5 + comm.rank)
        gradsync.settle_buffers(comm, bn)
        return bn.running_mean.tolist(), int(bn.num_batches_tracked)

    assert run_threads(3, rank) == [([1.0] * 3, 5)] * 3


# ---------------------------------------------------------------- the Python API, and using a run


def test_dist_train_fit_takes_objects_in_a_world_of_one(tmp_path):
    model = byo.small_cnn((1, 8, 8), 10, width=4)
    result = dist_train.fit({"data": {"target": "byo:CroppedDigits"}, "train": {"epochs": 1, "log_every": 0}},
                            model=model, loss=byo.smooth_cross_entropy, out_dir=tmp_path / "o")
    assert result.model is model and result.summary["steps"] == 23 and result.summary["meta"]["model"] == "object"
    assert (tmp_path / "o" / "model.pt").exists()
    assert dist_train.fit(cfg_of("train.epochs=1", "data.workers=0")).summary["eval"]["top5"] > 0.5


def finished_run(tmp_path):
    out = tmp_path / "run"
    cli.main(["local", str(BYO), "--out", str(out), "--set", "train.epochs=1", "--set", "data.workers=0"])
    return out


def test_eval_of_a_run_with_user_code_needs_trust_code(tmp_path, capsys):
    out = finished_run(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--trust-code" in err[0] and "'byo'" in err[0]
    assert cli.main(["eval", str(out), "--trust-code"]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert result["accuracy"] == pytest.approx(summary["eval"]["accuracy"]) and "top5" in result


def test_a_stored_config_naming_os_system_is_never_imported_without_trust(tmp_path, capsys):
    out = finished_run(tmp_path)
    payload = torch.load(out / "model.pt", weights_only=True)
    payload["config"]["model"]["target"] = "os:system"
    payload["config"]["model"]["kwargs"] = {"command": f"touch {tmp_path}/pwned"}
    torch.save(payload, out / "model.pt")
    for command in (["eval", str(out)], ["export", str(out), "--format", "onnx"],
                    ["predict", str(out), str(out), "--out", str(tmp_path / "p.parquet")]):
        with pytest.raises(SystemExit):
            cli.main(command)
        assert "it would import 'os'" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()
