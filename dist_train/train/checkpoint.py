"""Checkpoints, written atomically (files.atomic) and checked when read.

A checkpoint `step-00000123.pt` is followed by its checksum file
`step-00000123.pt.sha256`; a checkpoint without a matching checksum (killed between
the two, truncated, corrupted) is skipped with a warning and the previous one is used.
"""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import torch

from ..errors import UserError
from ..files import atomic, atomic_write


class _Hashing:
    """A write-only file that hashes what passes through it (torch.save streams into it)."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()
        self.error: OSError | None = None  # torch.save reports a failed write as its own RuntimeError

    def write(self, data) -> int:
        self.sha.update(data)
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_save(path: str | Path, obj) -> str:
    """torch.save `obj` to `path` atomically, streamed (no copy of it in memory); its sha256."""
    with atomic(path) as f:
        out = _Hashing(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None  # the disk's own error (no space, a quota), not torch's account of it
            raise
    return out.sha.hexdigest()


def to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load(f):
    """torch.load of a file or open file with weights_only=True: tensors and plain containers, never code."""
    return torch.load(f, map_location="cpu", weights_only=True)


def load_bytes(data: bytes):
    return load(io.BytesIO(data))


def save(directory: str | Path, step: int, state: dict, keep: int) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name(step)
    written = False
    try:
        digest = atomic_save(path, state)
        written = True
        atomic_write(path.with_name(path.name + ".sha256"), digest.encode())
    except OSError as e:  # a full disk, a quota, a file size limit: the temporary file is gone, the last one stays
        if written:  # the new bytes are in place but their checksum is not: neither file stands for them
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".sha256").unlink(missing_ok=True)
        raise UserError(f"{e.strerror or e} writing checkpoint step {step} in {directory}; the previous "
                        f"checkpoint is intact (free space, then --resume)") from None
    older = [p for p in listing(directory) if p != path and p.name < path.name]  # never newer ones
    for old in older[:max(len(older) - (keep - 1), 0)]:
        old.unlink(missing_ok=True)
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
    return path


def name(step: int) -> str:
    return f"step-{step:08d}.pt"


def listing(directory: str | Path) -> list[Path]:
    """Checkpoint files, oldest first."""
    directory = Path(directory)
    return sorted(directory.glob("step-*.pt")) if directory.is_dir() else []


def read_verified(path: Path) -> dict:
    """A checkpoint whose bytes match its checksum file, or UserError saying what is wrong."""
    sums = path.with_name(path.name + ".sha256")
    if not sums.exists():
        raise UserError(f"checkpoint {path} has no checksum file (its write did not finish)")
    with open(path, "rb") as f:  # hashed, then loaded, from the same open file
        if hashlib.file_digest(f, "sha256").hexdigest() != sums.read_text().strip():
            raise UserError(f"checkpoint {path} is corrupt or truncated (checksum mismatch)")
        f.seek(0)
        try:
            return load(f)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
            raise UserError(f"checkpoint {path} cannot be loaded: {type(e).__name__}: {e}") from None


def latest(directory: str | Path, warn=lambda msg: print(msg, file=sys.stderr), check=None) -> dict | None:
    """The newest checkpoint that verifies (and passes `check`, which raises UserError for
    one whose content is malformed), skipping (and naming) bad ones; None if none."""
    for path in reversed(listing(directory)):
        try:
            state = read_verified(path)
            if check is not None:
                try:
                    check(state)
                except UserError as e:
                    raise UserError(f"checkpoint {path} is malformed: {e}") from None
            return state
        except UserError as e:
            warn(f"warning: {e}; trying the previous checkpoint")
    return None
