"""A Parquet shard larger than memory, streamed into training from its local copy.

    sudo .venv/bin/python scripts/bench_stream.py [--gb 4] [--ram-mb 1536] [--window 65536] [--steps 600]

Writes a Parquet file of --gb GB (MNIST-shaped rows: one list column of 784 float32 and a
label), then, in a memory cgroup of --ram-mb MB (so the page cache cannot hold the data:
it is larger than this job's memory, for real), loads it as dist-train does (row group by
row group into a spool on local disk, data.cache_dir) and reads it back:

- the loader alone: WorkerData.feed over an epoch's batches of 128, GB/s of rows, with
  data.shuffle_window (the next window read ahead) and with the plain shuffle (a few
  seconds of it: every row a random read of the disk);
- training: `dist_train.fit` on the same file (local mode, a 784-256-10 MLP, batch 128,
  --steps steps), its data time as a share of the step: over the run, and after its first
  100 steps (the first window is read before the first step).

Needs root (a memory cgroup, v1 or v2, and dropping the page cache between the phases).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ROW = 784 * 4
LOG_EVERY = 100  # steps a metrics line: the lines after the first tell the steady state


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


def cgroup(limit_mb: int) -> Path:
    """A memory cgroup limited to limit_mb (v2, else v1); sys.exit if none can be made."""
    for base, key in ((Path("/sys/fs/cgroup"), "memory.max"), (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes")):
        if (base / "cgroup.procs").exists() and (key != "memory.max" or (base / "cgroup.controllers").exists()):
            cg = base / f"dist-train-bench-{os.getpid()}"
            try:
                cg.mkdir(exist_ok=True)
                (cg / key).write_text(str(limit_mb << 20))
                return cg
            except OSError as e:
                sys.exit(f"error: cannot make a memory cgroup under {base}: {e.strerror} (run as root)")
    sys.exit("error: no memory cgroup controller here (/sys/fs/cgroup)")


def write_parquet(path: Path, gb: float) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, chunk = int(gb * 1e9 / ROW), 65536
    with pq.ParquetWriter(path, pa.schema([("x", pa.list_(pa.float32(), 784)), ("label", pa.int64())]),
                          compression="none") as w:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            x = (np.arange(start, start + n, dtype=np.float32)[:, None] % 97 / 97.0 * np.ones(784, np.float32))
            w.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 784),
                                    "label": pa.array(np.arange(start, start + n) % 10)}))
    return rows


def child(a) -> dict:
    import numpy as np
    import torch

    import dist_train
    from dist_train import data
    from dist_train.data import sharding

    out = {}
    t = time.perf_counter()
    ds = data.load_parquet(a.parquet, "label", cache_dir=a.cache)
    out["spool_s"] = time.perf_counter() - t
    cpu = torch.device("cpu")
    for name, window, limit in (("window", a.window, None), ("plain shuffle", 0, 200)):
        drop_caches()
        w = data.WorkerData.whole(ds, 10, window=window)
        batches = sharding.epoch_batches(n=len(ds), seed=0, epoch=0, rank=0, world=1, batch_size=128,
                                         eval_fraction=0.0, sampling="shard", shuffle=True, window=window)[:limit]
        t, nbytes = time.perf_counter(), 0
        for _, xb, _ in w.feed(0, batches, cpu):
            nbytes += xb.numel() * 4
        out[name] = {"gb_s": nbytes / 1e9 / (time.perf_counter() - t), "batches": len(batches)}
    del ds
    drop_caches()
    cfg = {"data": {"name": "parquet", "path": str(a.parquet), "cache_dir": a.cache, "shuffle_window": a.window,
                    "eval_fraction": 0.0},
           "model": {"hidden": [256]}, "threads": 1, "comm": {"check_every_steps": 0},
           "train": {"batch_size": 128, "max_steps": a.steps, "epochs": 1, "log_every": LOG_EVERY, "eval_every": 0}}
    with tempfile.TemporaryDirectory(dir=a.cache) as run:
        s = dist_train.fit(cfg, out_dir=run).summary
        lines = [json.loads(ln) for ln in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    sec = s["seconds"]
    later = [ln for ln in lines if ln.get("kind") == "step"][1:]  # after the first LOG_EVERY steps (the first window)
    kinds = ("data_ms", "compute_ms", "optimizer_ms", "comm_ms", "wait_ms", "other_ms")
    out["train"] = {"samples_per_sec": s["samples_per_sec"], "data_share": sec["data"] / sum(sec.values()),
                    "data_ms": 1000 * sec["data"] / s["steps_run"],
                    "later_data_ms": sum(ln["data_ms"] for ln in later) / max(len(later), 1),
                    "later_share": sum(ln["data_ms"] for ln in later) / max(sum(ln[k] for ln in later for k in kinds), 1e-9)}
    out["peak_rss_mb"] = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) // 1024
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=4.0)
    ap.add_argument("--ram-mb", type=int, default=1536)
    ap.add_argument("--window", type=int, default=65536, help="data.shuffle_window, rows")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        a.parquet, a.cache = a.child / "data.parquet", str(a.child / "cache")
        print("RESULT " + json.dumps(child(a)))
        return
    if os.geteuid() != 0:
        sys.exit("error: needs root (a memory cgroup and dropping the page cache)")
    if a.gb * 1000 < 2 * a.ram_mb:
        sys.exit(f"error: --gb {a.gb} is not larger than twice --ram-mb {a.ram_mb}: the data would fit")
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        rows = write_parquet(Path(tmp) / "data.parquet", a.gb)
        drop_caches()
        cg = cgroup(a.ram_mb)
        try:
            p = subprocess.run([sys.executable, __file__, "--child", tmp, "--window", str(a.window), "--steps",
                                str(a.steps)], capture_output=True, text=True,
                               preexec_fn=lambda: (cg / "cgroup.procs").write_text(str(os.getpid())))
        finally:
            cg.rmdir()
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode or line is None:
        sys.exit(f"error: the run in the cgroup exited {p.returncode}: {p.stderr.strip().splitlines()[-1:]}")
    r = json.loads(line[len("RESULT "):])
    tr = r["train"]
    print(f"\n{a.gb:g} GB Parquet ({rows:,} rows of 784 float32), memory limit {a.ram_mb} MB, window {a.window:,} "
          f"rows ({a.window * ROW / 2**20:.0f} MB), {os.cpu_count()} cores; spooled in {r['spool_s']:.1f} s\n")
    print("| read | GB/s |\n|---|---|")
    print(f"| loader, data.shuffle_window {a.window} (next window read ahead) | {r['window']['gb_s']:.2f} |")
    print(f"| loader, plain shuffle ({r['plain shuffle']['batches']} batches) | {r['plain shuffle']['gb_s']:.3f} |")
    print(f"\ntraining (local, MLP 784-256-10, batch 128, {a.steps} steps): {tr['samples_per_sec']:,.0f} samples/s, "
          f"data {tr['data_ms']:.3f} ms a step, {tr['data_share']:.1%} of its time; after its first {LOG_EVERY} steps "
          f"(the first window's read): {tr['later_data_ms']:.3f} ms, {tr['later_share']:.1%}; "
          f"peak RSS {r['peak_rss_mb']} MB")


if __name__ == "__main__":
    main()
