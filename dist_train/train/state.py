"""Where training stands, what a checkpoint holds, and the checks a resume must pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import config
from ..errors import UserError, first_line

# a resume must read the same rows in the same order: these keys may not change
ORDER_KEYS = ("seed", "data.name", "data.path", "data.size", "data.sampling", "data.shuffle_window", "data.eval_fraction",
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


def checkpoint_state(model, optimizer, pos: Position, cfg, world_size: int, scaler=None, data=None) -> dict:
    """What a checkpoint holds (`data`: the data's fingerprint, which a resume compares);
    tensors on a GPU are saved as they are and loaded onto the CPU (checkpoint.load), so a
    GPU run's checkpoint resumes or evaluates on a CPU."""
    state = {
        "format": 1,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "position": vars(pos).copy(),
        "rng": torch.get_rng_state(),
        "config": config.to_dict(cfg),
        "world_size": world_size,
        "data": dict(data or {}),
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
        raise UserError(f"the checkpoint does not fit this model/optimizer: {mismatch(e)}") from None
    old, new = _order_of(ckpt.get("config", {})), dict(config.flat_items(config.to_dict(cfg)))
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


def mismatch(e: BaseException) -> str:
    """What load_state_dict's error says is wrong, in one line: its first missing or
    unexpected key or size mismatch (its first line only ends in a colon)."""
    for line in str(e).splitlines():
        line = line.strip().rstrip(".")
        if line.startswith(("Missing key", "Unexpected key", "size mismatch")):
            head, _, keys = line.partition(": ")
            if head.startswith(("Missing", "Unexpected")):
                keys = keys.split(", ")[0] + (", ..." if ", " in keys else "")
            return f"{head}: {keys}"[:300]
    return first_line(e).rstrip(":")


_TYPES = {"format": int, "model": dict, "optimizer": dict, "position": dict, "rng": torch.Tensor, "config": dict,
          "world_size": int}


def well_formed(ckpt, batches_per_epoch: int, cfg=None) -> None:
    """UserError naming what is wrong with a checkpoint whose bytes verified but whose
    content does not make one (a missing key, a wrong type, a position past the data: the
    last only where `cfg` reads the data as the checkpoint's run did, else restore and
    resumable say what changed)."""
    if not isinstance(ckpt, dict):
        raise UserError(f"it holds a {type(ckpt).__name__}, not a checkpoint's dict")
    for key, kind in _TYPES.items():
        if key not in ckpt:
            raise UserError(f"it has no {key!r}")
        if not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool):
            raise UserError(f"its {key!r} is a {type(ckpt[key]).__name__}, not a {kind.__name__}")
    fields = vars(Position())
    got = ckpt["position"]
    if set(got) != set(fields):
        raise UserError(f"its position has keys {sorted(got)}, not {sorted(fields)}")
    for key, default in fields.items():
        if not isinstance(got[key], type(default)) and not (isinstance(default, float) and isinstance(got[key], int)):
            raise UserError(f"its position's {key} is {got[key]!r}, not a {type(default).__name__}")
        if got[key] < 0:
            raise UserError(f"its position's {key} is negative ({got[key]})")
    if got["batch"] > batches_per_epoch and (cfg is None or _same_order(ckpt, cfg)):
        raise UserError(f"its position (batch {got['batch']} of the epoch) is past the data's "
                        f"{batches_per_epoch} batches per epoch")


def _same_order(ckpt: dict, cfg) -> bool:
    old, new = _order_of(ckpt["config"]), dict(config.flat_items(config.to_dict(cfg)))
    return all(old.get(k) == new.get(k) for k in ORDER_KEYS)


def _order_of(saved: dict) -> dict:
    """A checkpoint's config, flat, with the defaults of keys newer than it (data.shuffle_window)."""
    return {**config.defaults(), **dict(config.flat_items(saved))} if saved else {}


def resumable(ckpt: dict, pos: Position, fingerprint: dict, cfg) -> None:
    """A collective UserError where a checkpoint's run cannot go on here: its data changed
    since (rows, sample shape, outputs or the first rows), or it is already past what this
    run's train.epochs / train.max_steps ask for."""
    then = ckpt.get("data") or {}
    for key in ("rows", "sample_shape", "label_kind", "outputs", "first_rows"):
        if key in then and key in fingerprint and None not in (then[key], fingerprint[key]) \
                and then[key] != fingerprint[key]:
            what = key.replace("_", " ")
            _collective(f"--resume: the data changed since the checkpoint: {what} {then[key]} then, "
                        f"{fingerprint[key]} now (data: {cfg.data.path or cfg.data.name}): resume on the data it "
                        f"was trained on, or start a new run")
    t = cfg.train
    if pos.epoch > t.epochs or (pos.epoch == t.epochs and pos.batch > 0):
        done = f"{pos.epoch} epoch{'s' if pos.epoch != 1 else ''}" + (" and part of the next" if pos.batch else "")
        _collective(f"--resume: the checkpoint (step {pos.step}) has trained {done}, past train.epochs={t.epochs}: "
                    f"nothing to train; raise train.epochs to continue")
    if t.max_steps is not None and pos.step > t.max_steps:
        _collective(f"--resume: the checkpoint is at step {pos.step}, past train.max_steps={t.max_steps}: "
                    f"nothing to train; raise train.max_steps to continue")


def _collective(message: str):
    error = UserError(message)
    error.collective = True  # every worker finds it alike (they agreed on the data and the config)
    raise error


def _device(model) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))
