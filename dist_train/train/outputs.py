"""What a run leaves behind in its output directory (DESIGN.md), written by rank 0 only.

    model.pt        {"state_dict", "config", "meta"}; torch.load(..., weights_only=True)
    summary.json    launcher, world_size, steps, epochs, final_train_loss, eval, speed, time
    metrics.jsonl   one JSON object per logged step and per epoch
    tensorboard/    the same as TensorBoard scalars (log.tensorboard: true)
    (MLflow)        one run with the same numbers, the summary and model.pt (log.mlflow: true, tracking.py)
    checkpoints/    step-NNNNNNNN.pt (+ .sha256), for --resume

Call sites never test the rank: a `RunWriter` built with `active=False` does nothing
(STYLE.md 10).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .. import config, models, preempt
from ..data.items import from_jsonable
from ..errors import UserError, first_line
from ..files import atomic_write
from ..jobenv import PROGRESS_ENV
from . import checkpoint


class StaleRun(RuntimeError):
    """A retried job's older attempt tried to write after a newer one took over."""


def prepare_out_dir(out_dir: str | Path, resume: bool) -> Path:
    """Refuse to mix two runs in one directory; checked before any worker starts."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    has_run = (out / "summary.json").exists() or bool(checkpoint.listing(out / "checkpoints"))
    if has_run and not resume:
        raise UserError(f"--out {out} already holds a run; pass --resume to continue it or choose another --out")
    if resume and not has_run:  # never a silent fresh start where the user asked to continue
        what = "does not exist" if not out.exists() else "holds no run (no checkpoints, no summary.json)"
        raise UserError(f"--resume: {out} {what}: check the path, or drop --resume to start a new run")
    for where in (out, out / "checkpoints"):
        probe_writable(where, "--out" if where == out else "--out's checkpoints/")
    return out


MIN_FREE_BYTES = 16 << 20  # an --out on a filesystem with less free is refused (a checkpoint would not fit)


def probe_writable(path: Path, what: str) -> None:
    """UserError unless files can be made in `path` (or, not there yet, in the directory it
    would be made in) and its filesystem has MIN_FREE_BYTES free: found before any worker
    starts, not at the first checkpoint."""
    at = path
    while not at.exists():
        at = at.parent
    if not at.is_dir():
        raise UserError(f"{what} {path}: {at} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=at):  # a real write: os.access says yes on a read-only mount as root
            pass
    except OSError as e:
        raise UserError(f"{what} {path} is not writable ({e.strerror or e})") from None
    free = os.statvfs(at).f_bavail * os.statvfs(at).f_frsize
    if free < MIN_FREE_BYTES:
        raise UserError(f"{what} {path}: its filesystem has {free / 2**20:.1f} MiB free; free some space first")


class RunWriter:
    def __init__(self, out_dir: str | Path | None, active: bool, stream=sys.stdout, fence=None,
                 tensorboard: bool = False, on_record=None):
        self.active = active and out_dir is not None
        self.rank0 = active  # tracks the run (MLflow) even without --out
        self.tracker = None
        self.on_record = on_record if active else None
        self.fence = fence
        self.out = Path(out_dir) if out_dir is not None else None
        self.stream = stream if active else None  # None: print nothing
        self.tensorboard = tensorboard and self.active
        self._board = None
        self._bar, self._bar_epoch, self._drawn = None, -1, 0.0  # the epoch's tqdm bar (a terminal), last drawn
        self._launcher_tty: bool | None = None  # where a plain mpirun's own output goes (asked once)
        if self.active:
            self.out.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoint_dir(self) -> Path | None:
        return self.out / "checkpoints" if self.out is not None else None

    @property
    def tty(self) -> bool:
        """A terminal: a live progress bar; otherwise plain lines every log_every steps (batch logs, CI)."""
        if self.stream is None:
            return False
        forced = os.environ.get(PROGRESS_ENV)
        if forced in ("bar", "lines"):
            return forced == "bar"
        if not (hasattr(self.stream, "isatty") and self.stream.isatty()):
            return False
        if self._launcher_tty is None:
            self._launcher_tty = _launcher_output_is_a_terminal()
        return self._launcher_tty


    def log(self, message: str) -> None:
        if self.stream is not None:
            if self._bar is not None:
                self._bar.write(message, file=self.stream)  # above the bar, which is drawn again
            else:
                print(message, file=self.stream, flush=True)

    def progress(self, epoch: int, done: int, total: int, loss: float, rate: float, elapsed: float) -> None:
        """The epoch's tqdm progress bar (redrawn at most 5 times a second), terminal only."""
        if not self.tty:
            return
        if self._bar is None or self._bar_epoch != epoch:
            from tqdm import tqdm

            self._close_bar()
            size = shutil.get_terminal_size()  # a pty without a size says 0 x 0, which would hide the bar
            self._bar = tqdm(total=total, initial=max(done - 1, 0), desc=f"epoch {epoch}", unit="step",
                             file=self.stream, ncols=size.columns or 100, nrows=size.lines or 24, mininterval=0.2,
                             leave=True)
            self._bar_epoch = epoch
        self._bar.n = done
        now = time.monotonic()
        if now - self._drawn >= 0.2 or done >= total:
            self._drawn = now
            self._bar.set_postfix_str(f"loss {loss:.4f}, {rate:,.0f} samples/s", refresh=False)
            self._bar.refresh()
        if done >= total:
            self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def start_metrics(self, resumed_step: int | None) -> None:
        """Open metrics.jsonl; on resume keep only the lines up to the checkpoint's step."""
        if not self.active:
            return
        preempt.clear(self.out)  # an earlier attempt's stop request is not this one's
        path = self.out / "metrics.jsonl"
        if resumed_step is None:
            atomic_write(path, b"")
        elif path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill
                if rec.get("step", 0) <= resumed_step:
                    kept.append(line + "\n")
            atomic_write(path, "".join(kept).encode())
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard drops what an interrupted attempt logged past the checkpoint
            self._board = SummaryWriter(str(self.out / "tensorboard"), purge_step=resumed_step)

    def _owns_out(self) -> bool:
        if self.fence is not None and not self.fence():
            raise StaleRun(f"a newer attempt owns {self.out}: this one stops without writing")
        return True

    def start_tracking(self, cfg, run_id: str | None, launcher: str, world: int) -> None:
        """Rank 0: open (or, resumed, reopen) the job's MLflow run (log.mlflow)."""
        if self.rank0 and cfg.log.mlflow:
            from .tracking import Tracker

            self.tracker = Tracker(cfg, run_id, launcher, world)

    def finish_tracking(self, summary: dict, model_payload: dict) -> None:
        if self.tracker is not None:
            self.tracker.finish(summary, model_payload)
            self.tracker = None

    def tracking_failed(self, killed: bool = False) -> None:
        if self.tracker is not None:
            self.tracker.failed("KILLED" if killed else "FAILED")
            self.tracker = None

    def metric(self, record: dict) -> None:
        if self.on_record is not None:
            self.on_record(record)
        if self.tracker is not None:
            self.tracker.metrics(record)
        if self.active and self._owns_out():
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if self._board is not None:
                kind = record["kind"]
                for name, value in record.items():
                    if name not in ("kind", "step", "epoch", "time", "wall", "samples") and isinstance(value, (int, float)):
                        self._board.add_scalar(f"{kind}/{name}", value, record["step"])
                self._board.flush()

    def close(self) -> None:
        self._close_bar()
        if self._board is not None:
            self._board.close()
            self._board = None

    def final(self, model_payload: dict, summary: dict) -> None:
        """model.pt and summary.json (rank 0, while this run owns --out)."""
        if self.active and self._owns_out():
            write_final(self.out, model_payload, summary)

    def checkpoint(self, step: int, state: dict, keep: int) -> None:
        if self.active and self._owns_out():
            if self.tracker is not None:
                state["mlflow_run_id"] = self.tracker.run_id  # a resume continues the same run
            checkpoint.save(self.checkpoint_dir, step, state, keep)


def write_final(out_dir: str | Path, model_payload: dict, summary: dict) -> None:
    """model.pt and summary.json, atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_save(out / "model.pt", model_payload)
    atomic_write(out / "summary.json", summary_text(summary).encode())


def summary_text(summary: dict) -> str:
    """summary.json's text."""
    return json.dumps(summary, indent=2) + "\n"


def load_model_file(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise UserError(f"no model at {path}")
    try:
        return checkpoint.load(path)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path} is not a dist-train model: {type(e).__name__}: {e}") from None


def model_from_payload(payload: dict, where: str, cfg=None):
    """(config, model in eval mode, meta) from a model.pt payload: the model its config
    (`cfg`, if already built from it) builds, importing the user's modules it names, with
    the saved weights."""
    cfg = cfg if cfg is not None else config.build(dict(config.flat_items(payload["config"])), check_files=False)
    meta = payload["meta"]
    if meta.get("model") == "object":
        raise UserError(f"{where}: its model was given to dist_train.fit as an object; load model.pt's "
                        f"state_dict into that model instead")
    model = models.build(cfg, from_jsonable(meta["sample_shape"]), meta["outputs"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise UserError(f"{where}: the weights do not match their own config: {first_line(e)}") from None
    return cfg, model.eval(), meta


def _launcher_output_is_a_terminal() -> bool:
    """Under a plain mpirun each rank's stdout is a pty of mpirun's, whatever mpirun's own
    is: ask where mpirun (this rank's parent, on its host) writes, so `mpirun ... > log`
    gets lines, not a progress bar's carriage returns. Elsewhere, or unreadable: yes."""
    if not any(k in os.environ for k in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")):
        return True
    try:
        target = os.readlink(f"/proc/{os.getppid()}/fd/1")
    except OSError:
        return True
    return target.startswith(("/dev/pts/", "/dev/tty", "/dev/console"))
