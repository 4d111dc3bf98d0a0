"""Driver side: the workers' progress as it happens (Spark's own stage bar says only how
many tasks run, and a task's prints land in its executor's log).

With `--out` (a path the driver and the executors share) the driver follows rank 0's
metrics.jsonl there (`FileFollower`). Without it, the driver listens on a TCP port and
rank 0 sends each metrics record to it as a JSON line (`Listener`, `Sender`); where no
executor can reach the driver (a Spark Connect client outside the cluster), rank 0 gives
up after a second and training goes on without progress lines. Progress is best effort:
nothing here can fail a job.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

CONNECT_TIMEOUT_S = 1.0


def line(rec: dict) -> str | None:
    """The driver's line for a metrics record, or None."""
    if rec.get("kind") == "step":
        return (f"[dist-train] spark: step {rec['step']:>6}  epoch {rec['epoch']:>3}  loss {rec['loss']:.5f}  "
                f"{rec.get('samples_per_sec', 0):,.0f} samples/s")
    if rec.get("kind") == "epoch" and rec.get("loss") is not None:
        return f"[dist-train] spark: epoch {rec['epoch']} done, loss {rec['loss']:.5f}"
    if rec.get("kind") == "eval" and rec.get("loss") is not None:
        scores = "".join(f", {k} {v:.4f}" for k, v in rec.items() if k not in ("kind", "step", "epoch", "samples",
                                                                            "loss", "time", "wall")
                         and isinstance(v, float))
        return f"[dist-train] spark: held out at step {rec['step']}: loss {rec['loss']:.5f}{scores}"
    return None


def _show(text: str, log) -> None:
    try:
        rec = json.loads(text)
    except json.JSONDecodeError:
        return
    shown = line(rec) if isinstance(rec, dict) else None
    if shown is not None:
        log(shown)


class FileFollower(threading.Thread):
    """Follows rank 0's metrics.jsonl on the shared --out."""

    def __init__(self, path: Path, log):
        super().__init__(daemon=True, name="dist-train-progress")
        self.path, self.log, self.offset = path, log, path.stat().st_size if path.exists() else 0
        self.halt = threading.Event()
        self.start()

    def run(self):
        while not self.halt.wait(0.5):
            self.poll()

    def poll(self):
        if not self.path.exists():
            return
        if self.path.stat().st_size < self.offset:  # rewritten (a resumed attempt trims it)
            self.offset = 0
        with open(self.path) as f:
            f.seek(self.offset)
            for text in f:
                if not text.endswith("\n"):
                    break  # being written; next time
                self.offset += len(text)
                _show(text, self.log)

    def stop(self):
        self.halt.set()
        self.join(timeout=2)
        self.poll()


class Listener(threading.Thread):
    """A TCP port on the driver that rank 0 sends its records to; `addresses` are where
    the executors may find it (the driver's host as Spark knows it, this host's name)."""

    def __init__(self, log, driver_host: str | None):
        super().__init__(daemon=True, name="dist-train-progress")
        self.log = log
        self.server = socket.create_server(("", 0))
        self.server.settimeout(0.5)
        port = self.server.getsockname()[1]
        hosts = [h for h in (driver_host, socket.gethostname(), "127.0.0.1") if h]
        self.addresses = [(h, port) for h in dict.fromkeys(hosts)]
        self.halt = threading.Event()
        self.readers: list[threading.Thread] = []
        self.start()

    def run(self):
        while not self.halt.is_set():
            try:
                conn, _ = self.server.accept()
            except (TimeoutError, OSError):
                continue
            reader = threading.Thread(target=self._read, args=(conn,), daemon=True, name="dist-train-progress")
            reader.start()
            self.readers.append(reader)

    def _read(self, conn):
        with conn, conn.makefile("r", encoding="utf-8", errors="replace") as f:
            for text in f:
                _show(text, self.log)

    def stop(self):
        self.halt.set()
        self.join(timeout=2)
        for reader in self.readers:
            reader.join(timeout=2)  # what rank 0 sent before the job ended is shown before `done`
        self.server.close()


class Sender:
    """Rank 0's side: each metrics record as a JSON line to the driver; silent when the
    driver cannot be reached or goes away."""

    def __init__(self, addresses):
        self.sock = None
        for address in addresses:
            try:
                self.sock = socket.create_connection(tuple(address), timeout=CONNECT_TIMEOUT_S)
                self.sock.settimeout(CONNECT_TIMEOUT_S)
                break
            except OSError:
                continue

    def __call__(self, record: dict) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendall((json.dumps(record) + "\n").encode())
        except OSError:
            self.close()

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None
