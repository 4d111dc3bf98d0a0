"""Does a worker's memory grow with the dataset? Peak RSS per worker (rank 0's VmHWM,
summary.json's peak_rss_mb) for one epoch over a Parquet dataset at 1x and 8x the size,
under local mode, `mpirun -n 2` and Spark `local[2]` (whose tasks spool their partitions
to local disk; local and MPI spool the file row group by row group).

    .venv/bin/python scripts/bench_memory.py [--rows 200000] [--factor 8] [--launchers local,mpi,spark]

200,000 rows of 64 float32 features are 51 MB; x8 is 410 MB. Target: the 8x run's peak
within 1.25x of the 1x run's. A last row lifts the bound (data.resident_mb=0) to show what it
costs in speed. Prints a Markdown table.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SETS = ["model.name=mlp", "model.hidden=[16]", "train.epochs=1", "train.batch_size=1024", "train.log_every=0",
        "data.eval_fraction=0.02", "train.optimizer=sgd", "train.lr=0.05", "comm.check_every_steps=0"]


def write_parquet(path: Path, rows: int, width: int = 64, chunk: int = 100_000) -> float:
    """rows x width float32 features (one list column) labelled by a random linear teacher; MB of features."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    teacher = rng.standard_normal((width, 10), dtype=np.float32)
    schema = pa.schema([("features", pa.list_(pa.float32())), ("label", pa.int64())])
    with pq.ParquetWriter(path, schema, compression="none") as w:
        for at in range(0, rows, chunk):
            x = rng.standard_normal((min(chunk, rows - at), width), dtype=np.float32)
            offsets = pa.array(np.arange(len(x) + 1, dtype=np.int32) * width)
            w.write_table(pa.table({"features": pa.ListArray.from_arrays(offsets, pa.array(x.reshape(-1))),
                                    "label": np.argmax(x @ teacher, 1).astype(np.int64)}, schema=schema),
                          row_group_size=chunk)
    return rows * width * 4 / 2**20


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e["PYTHONPATH"] = f"{ROOT}{os.pathsep}{e.get('PYTHONPATH', '')}"
    return e


def run(launcher: str, data: Path, out: Path, extra=()) -> dict:
    sets = [*SETS, "data.name=parquet", f"data.path={data}", *extra]
    if launcher == "spark":
        sets.append("spark.workers=2")
    cmd = [str(BIN / "dist-train"), launcher, str(ROOT / "conf/digits.yaml"), "--out", str(out)]
    cmd += ["-n", "2"] if launcher == "mpi" else ["--master", "local[2]"] if launcher == "spark" else []
    cmd += [a for s in sets for a in ("--set", s)]
    start = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"{launcher} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    return {"rss": s["peak_rss_mb"], "wall": time.perf_counter() - start, "rate": s["samples_per_sec"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--factor", type=int, default=8)
    ap.add_argument("--launchers", default="local,mpi,spark")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dist-train-mem-") as tmp:
        tmp = Path(tmp)
        sizes = {}
        for scale in (1, args.factor):
            sizes[scale] = write_parquet(tmp / f"x{scale}.parquet", args.rows * scale)
        rows = []
        cases = [(name, name, ()) for name in args.launchers.split(",")]
        if "local" in args.launchers.split(","):
            cases.append(("local, data.resident_mb=0", "local", ("data.resident_mb=0",)))
        for label, launcher, extra in cases:
            got = {scale: run(launcher, tmp / f"x{scale}.parquet", tmp / f"{label}-{scale}".replace(" ", ""), extra)
                   for scale in sizes}
            one, many = got[1], got[args.factor]
            rows.append(f"| {label} | {one['rss']:,.0f} | {many['rss']:,.0f} | {many['rss'] / one['rss']:.2f}x | "
                        f"{one['rate']:,.0f} / {many['rate']:,.0f} | {one['wall']:.0f} / {many['wall']:.0f} |")
    print(f"\nPeak RSS per worker (rank 0), one epoch over {args.rows:,} and {args.rows * args.factor:,} rows "
          f"({sizes[1]:.0f} MB and {sizes[args.factor]:.0f} MB of features)\n")
    print(f"| launcher | 1x peak MB | {args.factor}x peak MB | ratio | samples/s (1x / {args.factor}x) "
          f"| wall s (1x / {args.factor}x) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
