"""What every worker must agree on, checked through the communicator itself.

- At start (`agree_at_start`): the config, the data (rows, sample shape, label kind,
  outputs, a hash of the first rows) and the step to start from, before any buffer is
  sized: workers started apart (an MPMD mpirun, a per-host data.path, an --out that is
  not shared) stop together with one line naming the ranks and the key, instead of a
  collective of mismatched sizes corrupting memory.
- During training (`check_parameters`): the parameters, every comm.check_every_steps.
"""

from __future__ import annotations

import json

import torch

from .. import config
from ..comm import broadcast_bytes
from ..errors import StartMismatch, TrainingError
from .gradsync import parameter_checksums

PER_WORKER = ("threads", "device", "data.path")  # may differ between workers (the data is compared instead)


def fingerprint(cfg, data: dict, start_step: int) -> dict[str, str]:
    """Key -> its value as JSON, for every key the workers must share."""
    keys = {k: v for k, v in config.flat_items(config.to_dict(cfg)) if k not in PER_WORKER}
    keys.update({f"the data's {k.replace('_', ' ')}": v for k, v in data.items()})
    keys["the step to start from"] = start_step
    return {k: json.dumps(v, sort_keys=True, default=repr) for k, v in keys.items()}


def agree_at_start(comm, cfg, data: dict, start_step: int) -> None:
    """Raise StartMismatch on every worker if any worker's fingerprint differs from rank 0's."""
    if comm.world_size == 1:
        return
    mine = fingerprint(cfg, data, start_step)
    root = _from_rank_0(comm, mine)
    keys = list(root)  # indices every worker reads alike; len(keys): a key rank 0 does not have
    first = next((i for i, k in enumerate(keys) if mine.get(k) != root[k]), None)
    if first is None and set(mine) - set(root):
        first = len(keys)
    flags = torch.zeros(comm.world_size, dtype=torch.float64)
    flags[comm.rank] = 0 if first is None else first + 1
    comm.allreduce(flags)  # dist: which ranks differ, and on which key first
    differing = [(r, int(f) - 1) for r, f in enumerate(flags.tolist()) if f]
    if not differing:
        return
    speaker, at = differing[0]
    ranks = ", ".join(str(r) for r, i in differing if i == at)
    key = keys[at] if at < len(keys) else "the config's keys (another version of dist-train?)"
    values = f": {mine.get(key)} on rank {speaker}, {root.get(key)} on rank 0" if comm.rank == speaker else ""
    error = StartMismatch(f"workers started differently: rank(s) {ranks} differ from rank 0 on {key}{values} "
                          f"({_hint(key)})")
    error.speaker = speaker
    raise error


def _hint(key: str) -> str:
    if key.startswith("the data"):
        return "every worker must read the same data"
    if key == "the step to start from":
        return "is the --out directory shared by every worker?"
    return "every worker must run the same config"


def _from_rank_0(comm, mine: dict) -> dict:
    """Rank 0's dict, on every worker."""
    return json.loads(broadcast_bytes(comm, json.dumps(mine).encode() if comm.rank == 0 else b"").decode())


def check_parameters(comm, model, step: int) -> None:
    """Stop every worker if their parameters drifted apart (DESIGN.md invariant 5)."""
    if comm.world_size == 1:
        return
    sums = parameter_checksums(comm, model)
    off = [r for r, v in enumerate(sums) if v != sums[0]]
    if off:
        raise TrainingError(f"parameters differ across workers at step {step}: rank(s) {', '.join(map(str, off))} "
                            f"differ from rank 0 (checksums {[sums[0]] + [sums[r] for r in off]})")
