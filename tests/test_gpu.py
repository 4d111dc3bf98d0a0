"""The GPU layer on a machine without one: the device choice (a pure function), the NCCL
vote, the feed's CPU path, fp16's global loss scale, GPU checkpoints on the CPU, the
launchers' device preflights. What needs a GPU is scripts/gpu_check.sh."""

import hashlib
import json
import sys

import numpy as np
import pytest
import torch

from dist_train import config, device
from dist_train.comm import LocalComm, gpu
from dist_train.data import transfer
from dist_train.errors import ConfigError, UserError
from dist_train.launchers.spark import driver
from dist_train.launchers.spark.task import Gpus
from dist_train.train import checkpoint
from dist_train.train.scaler import LossScale

from .helpers import BIN, ROOT, assert_same_weights, local, mpirun, ok, run, run_threads, weights

cuda = torch.device


def pick(spec="cuda", **kw):
    kw.setdefault("count", 4)
    return device.choose(spec, **kw)


# ---------------------------------------------------------------- the device choice


def test_cpu_is_chosen_where_asked_or_where_torch_sees_no_gpu():
    assert pick("cpu").device == cuda("cpu")
    auto = pick("auto", count=0)
    assert auto.device == cuda("cpu") and "no CUDA device" in auto.why
    with pytest.raises(ConfigError, match=r"device: cuda asked for, but torch sees no CUDA device \(CUDA_VISIBLE"):
        pick("cuda", count=0, visible="")


def test_one_gpu_per_local_worker():
    chosen = [pick("cuda", local_rank=r, local_size=4) for r in range(4)]
    assert [c.device for c in chosen] == [cuda("cuda", i) for i in range(4)]
    assert not any(c.shared for c in chosen) and "local rank 2 of 4" in chosen[2].why
    assert pick("auto", local_rank=1, local_size=2, count=2).device == cuda("cuda", 1)


def test_more_workers_than_gpus_are_refused_unless_sharing_is_asked_for():
    with pytest.raises(ConfigError, match="4 workers on this host but 2 GPU.*start at most 2 per host.*share_gpus"):
        pick("cuda", local_rank=0, local_size=4, count=2)
    shared = [pick("cuda", local_rank=r, local_size=4, count=2, share=True) for r in range(4)]
    assert [c.device.index for c in shared] == [0, 1, 0, 1] and all(c.shared for c in shared)
    auto = pick("auto", local_rank=3, local_size=4, count=2)  # auto never shares unasked: the CPU, and why
    assert auto.device == cuda("cpu") and "share_gpus" in auto.why


def test_an_explicit_ordinal():
    assert pick("cuda:1", count=2).device == cuda("cuda", 1)
    with pytest.raises(ConfigError, match="cuda:2 asked for, but torch sees 2 CUDA device"):
        pick("cuda:2", count=2)
    with pytest.raises(ConfigError, match="all 2 workers of this host would use it"):
        pick("cuda:0", local_size=2, count=2)
    assert pick("cuda:0", local_rank=1, local_size=2, count=2, share=True).shared


def test_cuda_visible_devices_subsets_renumber_from_zero():
    c = pick("cuda", local_rank=1, local_size=2, count=2, visible="2,3")
    assert c.device == cuda("cuda", 1) and "physical GPU 3" in c.why


@pytest.mark.parametrize("assigned, visible, count, index", [
    (["0"], None, 1, 0),
    (["3"], "2,3", 2, 1),  # a physical index, listed in CUDA_VISIBLE_DEVICES
    (["1"], "1", 1, 0),
    (["0"], "5", 1, 0),  # a container that renumbered its one GPU: already relative
    (["GPU-b"], "GPU-a,GPU-b", 2, 1),  # a UUID
])
def test_the_gpu_spark_assigned_the_task(assigned, visible, count, index):
    c = pick("cuda", assigned=assigned, visible=visible, count=count, local_rank=1, local_size=2)
    assert c.device == cuda("cuda", index) and "Spark GPU" in c.why


def test_spark_assignments_that_cannot_be_met():
    assert pick("auto", assigned=[]).device == cuda("cpu")
    with pytest.raises(ConfigError, match="Spark assigned this task no GPU: set spark.task.resource.gpu.amount"):
        pick("cuda", assigned=[])
    with pytest.raises(ConfigError, match="GPU 7 was assigned, but torch sees 2 device"):
        pick("cuda", assigned=["7"], count=2, visible="0,1")
    with pytest.raises(ConfigError, match="use cuda or auto"):
        pick("cuda:0", assigned=["0"])


def test_a_local_masters_pool_is_shared_out_by_local_rank():
    assert [pick("cuda", pool=["1", "2"], local_rank=r, local_size=2).device.index for r in range(2)] == [1, 2]
    assert pick("cuda", pool=["5"], visible="4,5", count=2).device == cuda("cuda", 1)
    with pytest.raises(ConfigError, match="2 workers on this host but 1 GPU"):
        pick("cuda", pool=["0"], local_size=2)


def test_nccl_only_between_workers_on_gpus_of_their_own():
    assert gpu.wants_nccl([True, True], [1, 2], nccl=True)
    assert not gpu.wants_nccl([True, True], [1, 1], nccl=True)  # one GPU shared: staged through the host
    assert not gpu.wants_nccl([True, False], [1, 0], nccl=True)
    assert not gpu.wants_nccl([True, True], [1, 2], nccl=False)
    line = gpu.describe([True, False], [1, 0], nccl=False)
    assert line == "devices by rank cuda:1 cpu; GPU gradients staged through pinned host memory"


def test_cpu_worlds_keep_their_communicator():
    comm = LocalComm()
    assert gpu.for_device(comm, cuda("cpu"), timeout_s=5)[0] is comm
    out = run_threads(2, lambda c: gpu.for_device(c, cuda("cpu"), timeout_s=5))
    assert [type(c).__name__ for c, _ in out] == ["ThreadComm", "ThreadComm"] and [s for _, s in out] == ["", ""]


def test_the_feed_on_the_cpu_is_the_plain_path():
    rows = np.arange(20, dtype=np.float32).reshape(10, 2)
    got = transfer.gather(rows, np.array([3, 1, 7]), cuda("cpu"))
    assert torch.equal(got, torch.tensor(rows[[3, 1, 7]]))
    batches = [(1, torch.ones(1), torch.zeros(1))]
    assert list(transfer.ahead(iter(batches), cuda("cpu")))[0] is batches[0]


# ---------------------------------------------------------------- fp16's loss scale


def test_the_loss_scale_halves_on_an_overflow_and_grows_after_good_steps():
    s = LossScale(8.0, growth_every=2)
    g = [torch.tensor([8.0, 16.0])]
    assert not s.unscale(g) and torch.equal(g[0], torch.tensor([1.0, 2.0]))
    assert s.unscale([torch.tensor([float("inf")])]) and s.unscale([torch.tensor([float("nan")])])
    s.update(True)
    assert (s.scale, s.overflows) == (4.0, 1)
    s.update(False), s.update(False)
    assert s.scale == 8.0
    t = LossScale(1.0, 5)
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()


FP16 = ["train.precision=fp16", "train.loss_scale=16777216", "train.loss_scale_growth_every=3",
        "data.sampling=global", "train.epochs=3"]


def test_fp16_skips_the_overflowing_steps_and_learns(tmp_path):
    out = tmp_path / "fp16"
    proc = ok(local("conf/digits.yaml", out, *FP16, "train.epochs=6"))
    s = json.loads((out / "summary.json").read_text())
    assert s["skipped_overflow_steps"] >= 3 and s["skipped_overflow_steps"] == proc.stdout.count("overflowed")
    assert s["eval"]["accuracy"] > 0.9 and s["loss_scale"] < 16777216


@pytest.mark.slow
def test_fp16_overflow_decisions_are_global_and_resume_exactly(tmp_path):
    """Whether fp16 overflows depends on each worker's batch, so two workers may see it
    differently: both still skip the same steps (the weights are compared every step)."""
    two = tmp_path / "two"
    proc = ok(mpirun(2, "conf/digits.yaml", two, *FP16, "comm.check_every_steps=1"))
    s = json.loads((two / "summary.json").read_text())
    assert s["skipped_overflow_steps"] >= 3 and proc.stdout.count("overflowed") == s["skipped_overflow_steps"]
    one, half = tmp_path / "one", tmp_path / "half"
    ok(local("conf/digits.yaml", one, *FP16))
    ok(local("conf/digits.yaml", half, *FP16[:-1], "train.epochs=1"))
    ok(local("conf/digits.yaml", half, *FP16, resume=True))  # the loss scale resumes where it was
    assert json.loads((half / "summary.json").read_text())["loss_scale"] == \
        json.loads((one / "summary.json").read_text())["loss_scale"]
    assert_same_weights(one, half, atol=0, rtol=0)


# ---------------------------------------------------------------- checkpoints across devices


def _as_if_saved_on_a_gpu(path, monkeypatch, extra=None):
    """Rewrite a torch file so its tensors say cuda:0 (what a GPU run writes)."""
    obj = torch.load(path, weights_only=True)
    if extra:
        obj.update(extra)
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(obj, path)
    sums = path.with_name(path.name + ".sha256")
    if sums.exists():  # a checkpoint: its checksum, as the GPU run would have written it
        sums.write_text(hashlib.sha256(path.read_bytes()).hexdigest())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks that a GPU file loads where there is no GPU")
def test_a_gpu_runs_checkpoint_resumes_and_evaluates_on_a_cpu(tmp_path, monkeypatch):
    sets = ["train.epochs=3", "model.hidden=[32]"]
    straight = tmp_path / "straight"
    ok(local("conf/digits.yaml", straight, *sets))
    out = tmp_path / "gpu"
    ok(local("conf/digits.yaml", out, "train.epochs=2", *sets[1:]))
    newest = checkpoint.listing(out / "checkpoints")[-1]
    _as_if_saved_on_a_gpu(newest, monkeypatch, {"cuda_rng": torch.zeros(16, dtype=torch.uint8)})
    _as_if_saved_on_a_gpu(out / "model.pt", monkeypatch)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(newest, weights_only=True)  # what a plain load does on a CPU machine
    evaluated = ok(run([BIN / "dist-train", "eval", str(out)]))
    assert "accuracy" in evaluated.stdout
    resumed = ok(local("conf/digits.yaml", out, *sets, resume=True))
    assert "resumed at step" in resumed.stdout and "corrupt" not in resumed.stdout + resumed.stderr
    assert_same_weights(straight, out, atol=0, rtol=0)


# ---------------------------------------------------------------- the launchers' preflights


def test_dist_train_mpi_refuses_a_device_its_ranks_cannot_have(tmp_path):
    for setting, says in [("cuda:0", "torch sees no CUDA device"), ("cuda", "torch sees no CUDA device")]:
        if torch.cuda.device_count() >= 2:
            says = "would use it" if setting == "cuda:0" else says
        proc = run([BIN / "dist-train", "mpi", "-n", "2", str(ROOT / "conf/digits.yaml"),
                    "--out", str(tmp_path / setting), "--set", f"device={setting}"])
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "error: config error: device:" in lines[0] and says in lines[0], proc.stderr
        assert not (tmp_path / setting).exists()  # nothing started, nothing written


class Conf:
    """A session's conf as the preflight reads it (plumbing: the real one needs a cluster)."""

    def __init__(self, master, **values):
        self.conf = self
        self.values = {"spark.master": master, **{k.replace("_", "."): v for k, v in values.items()}}

    def get(self, key, default=None):
        return self.values.get(key, default)


def cfg_with(*sets):
    return config.load(str(ROOT / "conf/digits.yaml"), ["spark.workers=2", *sets])


def test_the_spark_preflight_without_gpu_resources():
    assert driver.gpus(Conf("spark://h:7077"), cfg_with(), "spark://h:7077") == Gpus(assigned=True)
    assert driver.gpus(Conf("spark://h:7077"), cfg_with("device=cpu"), "spark://h:7077") == Gpus()
    with pytest.raises(UserError, match="device: cuda on a Spark cluster needs GPU scheduling: set "
                                        "spark.executor.resource.gpu.amount"):
        driver.gpus(Conf("yarn"), cfg_with("device=cuda"), "yarn")
    with pytest.raises(ConfigError, match="cuda:0: a Spark task uses the GPU Spark assigns it"):
        driver.gpus(Conf("yarn"), cfg_with("device=cuda:0"), "yarn")


def test_the_spark_preflight_with_gpu_resources():
    both = {"spark_task_resource_gpu_amount": "1", "spark_executor_resource_gpu_amount": "1"}
    assert driver.gpus(Conf("yarn", **both), cfg_with("device=cuda"), "yarn") == Gpus(assigned=True)
    with pytest.raises(UserError, match="without spark.executor.resource.gpu.amount"):
        driver.gpus(Conf("yarn", spark_task_resource_gpu_amount="1"), cfg_with("device=cuda"), "yarn")
    half = {**both, "spark_task_resource_gpu_amount": "0.5"}
    with pytest.raises(UserError, match="0.5 puts several tasks on one GPU: set comm.share_gpus"):
        driver.gpus(Conf("yarn", **half), cfg_with("device=cuda"), "yarn")
    assert driver.gpus(Conf("yarn", **half), cfg_with("device=cuda", "comm.share_gpus=true"), "yarn").assigned
    with pytest.raises(UserError, match="under a local master: Spark never schedules such tasks"):
        driver.gpus(Conf("local[2]", **both), cfg_with(), "local[2]")


def discovery_script(directory, addresses) -> str:
    """A Spark GPU discovery script announcing `addresses` (no GPU needs to be there)."""
    script = directory / "gpus.sh"
    script.write_text(f"#!/bin/sh\necho '{json.dumps({'name': 'gpu', 'addresses': addresses})}'\n")
    script.chmod(0o755)
    return str(script)


def spark_args(confs: dict) -> list[str]:
    return [a for k, v in confs.items() for a in ("--spark-arg=--conf", f"--spark-arg={k}={v}")]


@pytest.mark.slow
def test_dist_train_spark_refuses_gpu_task_resources_under_a_local_master(tmp_path):
    out = tmp_path / "gpu"
    confs = {"spark.task.resource.gpu.amount": "1", "spark.executor.resource.gpu.amount": "1",
             "spark.executor.resource.gpu.discoveryScript": discovery_script(tmp_path, ["0"])}
    proc = run([BIN / "dist-train", "spark", str(ROOT / "conf/digits.yaml"), "--master", "local[2]",
                "--out", str(out), "--set", "spark.workers=2", *spark_args(confs)], timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "spark.task.resource.gpu.amount=1 under a local master" in proc.stderr + proc.stdout
    assert not (out / "model.pt").exists()


def test_the_log_names_every_workers_device(tmp_path):
    proc = ok(local("conf/xor.yaml", tmp_path / "auto", "device=auto"))
    expect = "device cpu (no CUDA device)" if not torch.cuda.is_available() else "device cuda:0 (local rank 0 of 1"
    assert expect in proc.stdout
    assert "device cpu, " in ok(local("conf/xor.yaml", tmp_path / "cpu", "device=cpu")).stdout



@pytest.mark.slow
def test_spark_local_master_with_driver_gpus_configured_runs(tmp_path):
    """The driver's GPU resources are the local master's pool; here torch sees none of
    them, so auto computes on the CPU and says why."""
    out = tmp_path / "run"
    confs = {"spark.driver.resource.gpu.amount": "2",
             "spark.driver.resource.gpu.discoveryScript": discovery_script(tmp_path, ["0", "1"])}
    proc = ok(run([BIN / "dist-train", "spark", str(ROOT / "conf/xor.yaml"), "--master", "local[2]",
                   "--out", str(out), "--set", "spark.workers=2", *spark_args(confs)], timeout=180))
    s = json.loads((out / "summary.json").read_text())
    assert (s["device"], s["device_reason"]) == ("cpu", "no CUDA device") and "eval accuracy 1.0000" in proc.stdout
