"""Where training stands, what a checkpoint holds, and the checks a resume must pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import config
from ..errors import UserError, first_line

# a resume must read the same rows in the same order: these keys may not change
ORDER_KEYS = ("seed", "data.name", "data.path", "data.size", "data.sampling", "data.eval_fraction",
              "data.target", "data.kwargs", "train.batch_size", "train.shuffle", "train.accumulate")


@dataclass
class Position:
    """Where training stands: the next step to run."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch: int = 0  # index of the next local batch within the epoch
    samples: int = 0  # training samples seen, all workers
    epoch_loss: float = 0.0  # loss summed over the current epoch's samples
    epoch_count: int = 0


def checkpoint_state(model, optimizer, pos: Position, cfg, world_size: int, scaler=None) -> dict:
    """What a checkpoint holds; tensors on a GPU are saved as they are and loaded onto the
    CPU (checkpoint.load), so a GPU run's checkpoint resumes or evaluates on a CPU."""
    state = {
        "format": 1,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "position": vars(pos).copy(),
        "rng": torch.get_rng_state(),
        "config": config.to_dict(cfg),
        "world_size": world_size,
    }
    device = _device(model)
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)  # dropout on the GPU draws from it
    if scaler is not None:
        state["loss_scale"] = scaler.state_dict()
    return state


def restore(ckpt: dict, model, optimizer, cfg, world_size: int, scaler=None) -> Position:
    """Load a checkpoint into `model` and `optimizer` (and fp16's `scaler`); where it was.
    UserError if it does not fit this model, optimizer, data order or world. A checkpoint
    from a GPU resumes on a CPU and the other way round (its GPU random state is used on a
    GPU only)."""
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise UserError(f"the checkpoint does not fit this model/optimizer: {first_line(e)}") from None
    old, new = dict(config.flat_items(ckpt.get("config", {}))), dict(config.flat_items(config.to_dict(cfg)))
    for key in ORDER_KEYS:
        if old.get(key) != new.get(key):
            raise UserError(f"--resume: the checkpoint was trained with {key}={old.get(key)!r}, this run has "
                            f"{new.get(key)!r}")
    if ckpt.get("world_size") != world_size and cfg.data.sampling == "shard":
        raise UserError(f"--resume: the checkpoint was trained by {ckpt.get('world_size')} workers with "
                        f"data.sampling shard, which ties each worker's rows to the world size: resume with "
                        f"{ckpt.get('world_size')} workers (a run that must survive a change of world size "
                        f"trains with data.sampling: global from its start)")
    torch.set_rng_state(ckpt["rng"])
    device = _device(model)
    if device.type == "cuda" and "cuda_rng" in ckpt:
        torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
    if scaler is not None and "loss_scale" in ckpt:
        scaler.load_state_dict(ckpt["loss_scale"])
    return Position(**ckpt["position"])


def _device(model) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))
