"""Shared test helpers: running the launchers for real, a threaded fake communicator,
and a plain-PyTorch oracle that knows nothing of the engine."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import torch

from dist_train import models
from dist_train.comm import Communicator
from dist_train.data import sharding
from dist_train.launchers.mpi import command as mpirun_command
from dist_train.train import losses

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
IS_ROOT = os.geteuid() == 0


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e["PYTHONPATH"] = f"{ROOT}{os.pathsep}{e.get('PYTHONPATH', '')}"
    e.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    return e


# Open MPI 5's launcher now and then fails before starting any rank (openpmix: 'ptl_tool: problems
# getting address'); that run is repeated once, any other failure stands.
MPIRUN_DID_NOT_START = "The PMIx server's listener thread failed to start"


def run(cmd: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env(),
                       cwd=ROOT, **kw)
    if p.returncode != 0 and MPIRUN_DID_NOT_START in (p.stderr or "") + (p.stdout or ""):
        p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env(),
                           cwd=ROOT, **kw)
    return p


def local(config, out, *sets, resume=False, timeout=120):
    return run([sys.executable, ROOT / "launchers/local.py", config, "--out", out,
                *[a for s in sets for a in ("--set", s)]] + (["--resume"] if resume else []), timeout=timeout)


def mpirun_cmd(n, program, extra=()) -> list[str]:
    """The project's one mpirun command line (dist_train.launchers.mpi.command), oversubscribed."""
    return mpirun_command(n, [str(c) for c in program], ["--oversubscribe", *extra])


def mpirun(n, config, out, *sets, extra=(), resume=False, timeout=120):
    program = [sys.executable, ROOT / "launchers/mpi.py", config, "--out", out]
    program += [a for s in sets for a in ("--set", s)] + (["--resume"] if resume else [])
    return run(mpirun_cmd(n, program, extra), timeout=timeout)


def errors(p) -> list[str]:
    """The `error:` lines of a finished run, stdout and stderr. mpirun forwards the ranks'
    lines through its own output, which can put a NUL byte before one (right after its
    MPI_ABORT banner: the banner's string terminator), so a line is taken without it."""
    return [line.lstrip("\0 ") for line in (p.stderr + p.stdout).splitlines() if line.lstrip("\0 ").startswith("error:")]


def weights(out_dir) -> dict[str, torch.Tensor]:
    return torch.load(Path(out_dir) / "model.pt", weights_only=True)["state_dict"]


def assert_same_weights(a, b, atol=1e-5, rtol=1e-4):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc


class ThreadComm(Communicator):
    """N ranks as threads of one process: sums in rank order, for oracle tests."""

    def __init__(self, rank: int, world: int, shared: dict):
        self.rank, self.world_size, self.shared = rank, world, shared

    def _exchange(self, buf):
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[self.rank] = buf.detach().clone()
        barrier.wait()
        result = [s for s in slots]
        barrier.wait()
        return result

    def allreduce(self, buf):
        parts = self._exchange(buf)
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        buf.copy_(total)

    def broadcast(self, buf, root=0):
        buf.copy_(self._exchange(buf)[root])


class PosedComm(Communicator):
    """Rank `rank` of a world of `world` whose collectives are the identity (plumbing only:
    the buffers of a world of several, without the peers)."""

    def __init__(self, rank=0, world=2):
        self.rank, self.world_size = rank, world

    def allreduce(self, buf):
        pass

    def broadcast(self, buf, root=0):
        pass


def run_threads(world: int, fn):
    """Run fn(comm) on `world` threads; return the results in rank order."""
    shared = {"slots": [None] * world, "barrier": threading.Barrier(world, timeout=30)}
    results, errors = [None] * world, []

    def body(r):
        try:
            results[r] = fn(ThreadComm(r, world, shared))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            shared["barrier"].abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def oracle_sgd(cfg, ds, outputs, world: int) -> dict[str, torch.Tensor]:
    """Plain PyTorch, no engine: each step's global batch is the union of the ranks'
    local batches (from the sharding plan); SGD on its mean loss."""
    torch.manual_seed(cfg.seed)
    model = models.build(cfg, ds.sample_shape, outputs)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
    for epoch in range(cfg.train.epochs):
        plans = [sharding.epoch_batches(n=len(ds), seed=cfg.seed, epoch=epoch, rank=r, world=world,
                                        batch_size=cfg.train.batch_size, eval_fraction=cfg.data.eval_fraction,
                                        sampling=cfg.data.sampling, shuffle=cfg.train.shuffle)
                 for r in range(world)]
        for step in range(max(len(p) for p in plans)):
            rows = np.concatenate([p[step] for p in plans if step < len(p)])
            x, y = torch.from_numpy(ds.x[rows]), torch.from_numpy(ds.y[rows])
            opt.zero_grad()
            (losses.loss_sum(cfg.train.loss, model(x), y) / len(rows)).backward()
            opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def in_shared_memory(t: torch.Tensor) -> bool:
    """Does `t` lie in a dist-train segment of /dev/shm (mapped, its file already unlinked)?"""
    address = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            span, *rest = line.split()
            lo, hi = (int(v, 16) for v in span.split("-"))
            if lo <= address < hi:
                return "/dev/shm/dist-train-" in line
    return False
