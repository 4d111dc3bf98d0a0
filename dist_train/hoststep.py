"""The optimizer step split among the workers of one host (`comm.shard_optimizer`).

After the shared-memory sum (shm.SharedGrads) worker i holds the mean gradients of part
i in its own slot. Here the parameters live once per host in a shared segment, every
worker's modules view them, and worker i steps only part i with its own optimizer:

    barrier -> sum part i (no copy of it into the other slots) -> barrier
    -> step part i of the parameters -> barrier -> next forward

So the optimizer's work and state are split among the workers and no summed gradient is
copied. Two rules keep it exact and fast:

- The parameters are stepped as per-tensor pieces, each cut at a multiple of 64 elements
  from the start of its tensor. torch's fused CPU kernels treat the last (length mod the
  vector width) elements of a tensor apart; cut elsewhere, other elements land there and
  come out one ulp apart (measured: fused SGD, torch 2.13). At such cuts the pieces step
  bit for bit as the whole tensors do (tested against the plain step, SGD and Adam).
- Two parameter buffers: step t reads buffer t % 2 and writes the other. A step that
  wrote the buffer the other workers had just read in their forward would invalidate
  each of their cached copies line by line: on one buffer the half step took as long as
  the whole step on private parameters (docs/performance.md).

Each parameter is a tensor of its own storage in the segment, so torch.save (checkpoints,
model.pt) writes just its bytes and nothing is copied out for it. The parameters stay
there after training: every worker holds the same final weights, read from then on.

`state_dict()` gathers the optimizer state into the per-tensor form a plain optimizer
over the model gives (a collective), so checkpoints move freely between launchers and
world sizes; `share()` scatters one the same way.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from . import shm
from .comm import same_memory

ALIGN = 64  # elements: a cut falls at a multiple of this from the start of its tensor


def share(comm, grads, optimizer: torch.optim.Optimizer, enabled: bool, min_bytes: float = 0):
    """`optimizer` (a plain one over the model's parameters, its state possibly restored)
    split among the workers of this host, or `optimizer` itself where that cannot be or
    does not pay: more than one host, no shared gradient buffer, an unfused or other
    optimizer, or a model of less than `min_bytes` (see below) or too small to give every
    worker a part. Collective; every worker decides alike.

    Why a floor: on a model whose step stays in cache the half step saves little, and the
    parameters every core reads and half of them writes each step cost cross-core traffic.
    On this project's 2-core machine the 2.7 MB MLP ran either like the private step or,
    in most runs of some periods, 20% slower (copying a part into the next buffer 0.09 ->
    0.4-0.5 ms, forward and backward 5-30% slower; the state switches within a run, so it
    belongs to the host, not to where the run's memory landed); the 80 MB wide MLP gained 4-5%."""
    shared = getattr(comm, "shared", None)
    if not enabled or shared is None or comm.hosts != 1 or not same_memory(grads.flat, shared.mine) \
            or grads.nbytes < min_bytes:
        return optimizer
    if type(optimizer) not in (torch.optim.SGD, torch.optim.Adam) or not optimizer.defaults.get("fused") \
            or len(optimizer.param_groups) != 1:
        return optimizer
    cuts = _cuts(grads.params, comm.local_size)
    if any(a >= b for a, b in zip(cuts, cuts[1:])):
        return optimizer
    segment = _open_segment(comm, grads.n, grads.flat.dtype)
    return optimizer if segment is None else HostStep(comm, grads, optimizer, cuts, segment)


def _cuts(params, size: int) -> list[int]:
    """Part boundaries near i * n / size, each moved down to a multiple of ALIGN elements
    from the start of the tensor it falls in; [0, ..., n]."""
    n = sum(p.numel() for p in params)
    cuts = []
    for r in range(size):
        at, start = r * n // size, 0
        for p in params:
            if at < start + p.numel():
                at = start + (at - start) // ALIGN * ALIGN
                break
            start += p.numel()
        cuts.append(at)
    return cuts + [n]


def _open_segment(comm, n: int, dtype: torch.dtype):
    """Two parameter buffers in one shared segment, mapped by every worker of the host, or
    None on every worker if any could not (a full /dev/shm)."""
    item = torch.empty((), dtype=dtype).element_size()
    stride = -(-n * item // 4096) * 4096 // item  # page-aligned buffers
    path = comm.shm_path.with_name(comm.shm_path.name + "-params")
    segment, ok = None, True
    if comm.local_rank == 0:
        try:
            segment = shm._map_segment(path, 2 * stride * item, True)
        except OSError:
            ok = False
    created = comm.agree(ok)
    if created and comm.local_rank != 0:
        try:
            segment = shm._map_segment(path, 2 * stride * item, False)
        except OSError:
            ok = False
    usable = comm.agree(ok) and created
    if segment is not None and comm.local_rank == 0:
        os.unlink(path)  # mapped by every worker (or given up): nothing left behind after a crash
    return (segment, stride) if usable else None


class HostStep:
    """What the training loop needs of an optimizer (param_groups, step, state_dict),
    for this worker's part of the host's parameters; see the module's docstring."""

    def __init__(self, comm, grads, plain: torch.optim.Optimizer, cuts: list[int], segment):
        self.shared, self.plain = comm.shared, plain
        self.params = grads.params
        self._segment, stride = segment
        starts = [0, stride]  # the two buffers, in elements
        flat = _tensor(self._segment, grads.flat.dtype, 0, starts[1] + grads.n)
        self.bufs = [flat[at:at + grads.n] for at in starts]
        self.lo, self.hi = cuts[comm.local_rank], cuts[comm.local_rank + 1]
        self.cuts = cuts
        self.cur = 0
        self.views = [_views(self.params, self._segment, at) for at in starts]
        # my part as per-tensor pieces: (parameter index, its elements [a, b) within the parameter, and in the buffer)
        self.pieces, start = [], 0
        for i, p in enumerate(self.params):
            a, b = max(start, self.lo), min(start + p.numel(), self.hi)
            if a < b:
                self.pieces.append((i, a - start, b - start, a, b))
            start += p.numel()
        with torch.no_grad():  # every worker holds the same parameters: each copies its part in
            for i, a, b, lo, hi in self.pieces:
                self.bufs[0][lo:hi].copy_(self.params[i].reshape(-1)[a:b])
        self.shared.arrivals.wait()
        for p, v in zip(self.params, self.views[0]):
            p.data = v
        self.piece_views = [[buf[a:b] for *_, a, b in self.pieces] for buf in self.bufs]
        self.qs = [buf_view.view(-1) for buf_view in self.piece_views[0]]  # own objects: .data moves each step
        for q, (*_, a, b) in zip(self.qs, self.pieces):
            q.grad = self.shared.mine[a:b]
        # the plain optimizer's hyperparameters, restored from a checkpoint too (as load_state_dict sets them)
        group = plain.param_groups[0]
        self.inner = type(plain)(self.qs, **{k: group[k] for k in plain.defaults if k in group})
        self._scatter_state()
        last = len(self.shared.slots[0])
        self.shared.set_part(self.lo, self.hi if self.hi < cuts[-1] else last, copy_from=cuts[-1])

    @property
    def param_groups(self):
        return self.inner.param_groups

    def step(self) -> None:
        nxt = 1 - self.cur
        self.bufs[nxt][self.lo:self.hi].copy_(self.bufs[self.cur][self.lo:self.hi])
        for q, v in zip(self.qs, self.piece_views[nxt]):
            q.data = v
        self.inner.step()
        self.shared.arrivals.wait()  # every part stepped
        for p, v in zip(self.params, self.views[nxt]):
            p.data = v
        self.cur = nxt

    def state_dict(self) -> dict:
        """The plain optimizer's state dict for the whole model (collective over the host),
        to be saved before the next step: its last per-element state (SGD's momentum) is
        read in place from the parameter buffer that step writes."""
        plain = self.plain
        state = self._gathered_state()
        plain.param_groups[0]["lr"] = self.inner.param_groups[0]["lr"]
        plain.state.clear()
        for i, s in state.items():
            plain.state[self.params[i]] = s
        out = plain.state_dict()
        plain.state.clear()
        return out

    def _scatter_state(self) -> None:
        """My pieces' state, cut from the plain optimizer's (restored from a checkpoint, or empty)."""
        plain = self.plain
        for q, (i, a, b, *_) in zip(self.qs, self.pieces):
            whole = plain.state.get(self.params[i])
            if not whole:
                continue
            self.inner.state[q] = {k: v.reshape(-1)[a:b].clone() if _per_element(v, self.params[i]) else
                                   (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in whole.items()}
        plain.state.clear()  # the full copy is not kept

    def _gathered_state(self) -> dict:
        """{parameter index: {key: value}} for the whole model: per-element tensors through the
        buffer no step reads now (each worker writes its part, then all read it), the rest
        from my own first piece (the same on every worker: a step count). The last key's
        tensors are views into the free buffer (no copy), valid until the next step."""
        mine = [self.inner.state.get(q) for q in self.qs]
        if not mine or not mine[0]:
            return {}
        free = self.bufs[1 - self.cur]
        out: dict[int, dict] = {i: {} for i in range(len(self.params))}
        keys = [k for k, v in mine[0].items() if _per_element(v, self.qs[0])]
        for key, value in mine[0].items():
            if key in keys:
                for s, (*_, a, b) in zip(mine, self.pieces):
                    free[a:b].copy_(s[key])
                self.shared.arrivals.wait()
                for i, v in enumerate(self.views[1 - self.cur]):
                    out[i][key] = v if key == keys[-1] else v.clone()
                self.shared.arrivals.wait()  # all have read it before it is written again
            else:
                for i in out:
                    out[i][key] = value.clone() if isinstance(value, torch.Tensor) else value
        return out


def _tensor(segment, dtype: torch.dtype, start: int, n: int) -> torch.Tensor:
    """Elements [start, start + n) of `segment` as a flat tensor of its own storage."""
    np_dtype = np.dtype(shm.GRAD_DTYPES[dtype])
    return torch.from_numpy(np.frombuffer(segment, dtype=np_dtype, count=n, offset=start * np_dtype.itemsize))


def _views(params, segment, start: int) -> list[torch.Tensor]:
    """Each parameter's place in the buffer at element `start`, a storage of its own
    (torch.save writes a view's whole storage: a view of the segment would write all of it)."""
    out = []
    for p in params:
        out.append(_tensor(segment, p.dtype, start, p.numel()).view_as(p))
        start += p.numel()
    return out


def _per_element(value, param) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == param.shape
