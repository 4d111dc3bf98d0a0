"""How fast the data path streams a memory-mapped dataset: batches of rows in a shuffled
order through the same WorkerData.batch the training loop uses.

    .venv/bin/python scripts/loader_bench.py [--gb 1.0] [--batch 128]

Writes an uncompressed .npz of about --gb GB (float32, MNIST-shaped rows) to a temporary
directory, opens it memory-mapped (data.load_npz) and reads one shuffled epoch. The file
was just written, so it is read from the page cache: the figure is the loader's own cost
(index, gather, tensor), not the disk's.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dist_train import data
from dist_train.data import WorkerData


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=128)
    a = ap.parse_args()
    rows = int(a.gb * 1e9 / (784 * 4))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.npz"
        x = np.lib.format.open_memmap(Path(tmp) / "x.npy", mode="w+", dtype=np.float32, shape=(rows, 1, 28, 28))
        for i in range(0, rows, 65536):
            x[i:i + 65536] = np.random.default_rng(i).standard_normal(x[i:i + 65536].shape, dtype=np.float32)
        x.flush()
        np.savez(path, x=x, y=np.zeros(rows, dtype=np.int64))
        del x
        ds = data.load_npz(path)
        assert isinstance(ds.x, np.memmap)
        w = WorkerData.whole(ds, 10)
        order = np.random.default_rng(0).permutation(rows)
        cpu = torch.device("cpu")
        for name, idx in (("shuffled", order), ("sequential", np.arange(rows))):
            start = time.perf_counter()
            nbytes = 0
            for i in range(0, rows, a.batch):
                xb, _ = w.batch(idx[i:i + a.batch], cpu)
                nbytes += xb.numel() * 4
            dt = time.perf_counter() - start
            print(f"{name:10} {nbytes / 1e9:.2f} GB in {dt:.2f} s = {nbytes / 1e9 / dt:.2f} GB/s "
                  f"({rows / dt:,.0f} rows/s, batch {a.batch})")


if __name__ == "__main__":
    main()
