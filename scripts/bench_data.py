"""Does data.workers pay where items cost? Training samples/s of one worker (local mode)
on images stored as PNG files' bytes, decoded with Pillow, cropped and flipped at random
in `__getitem__`, with 0, 1 and 2 data processes, against the same images pre-decoded
into an array (the built-in array path, nothing to do per item).

    .venv/bin/python scripts/bench_data.py [--images 6000] [--epochs 2] [--reps 2]

Prints a Markdown table; each row's runs are interleaved with the others' (the machine's
noise falls on every row alike), the median is shown.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dist_train  # noqa: E402
from dist_train import data, device  # noqa: E402

SIZE, CROP = 32, 28  # decoded-and-resized side, crop
ARRAY = "array (pre-decoded, .npz)"


class PngImages:
    """Grey images as PNG bytes; item i: decode, random 28x28 crop, random flip."""

    num_classes = 10

    def __init__(self, pngs: list[bytes], labels: np.ndarray):
        self.pngs, self.labels = pngs, labels

    def __len__(self):
        return len(self.pngs)

    def __getitem__(self, i):
        img = Image.open(io.BytesIO(self.pngs[i])).resize((SIZE, SIZE), Image.BILINEAR)
        img = np.asarray(img, dtype=np.float32) / 255.0
        g = data.item_generator()
        top, left, flip = torch.randint(0, SIZE - CROP + 1, (3,), generator=g).tolist()
        x = img[top:top + CROP, left:left + CROP]
        if flip % 2:
            x = x[:, ::-1]
        return torch.from_numpy(x.copy()).unsqueeze(0), int(self.labels[i])


def make_images(n: int, stored: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    pngs, decoded = [], np.zeros((n, 1, CROP, CROP), np.float32)
    for i in range(n):
        img = Image.fromarray((rng.random((stored, stored)) * 64 + labels[i] * 19).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        pngs.append(buf.getvalue())
        small = np.asarray(img.resize((SIZE, SIZE), Image.BILINEAR), dtype=np.float32) / 255.0
        decoded[i, 0] = small[2:2 + CROP, 2:2 + CROP]
    return pngs, decoded, labels


def lenet(input_shape, outputs):
    c, h, w = input_shape
    return nn.Sequential(nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5, padding=2),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * (h // 4) * (w // 4), 120), nn.ReLU(),
                         nn.Linear(120, outputs))


def train(cfg: dict, **given) -> float:
    t0 = time.perf_counter()
    result = dist_train.fit(cfg, model=lenet, **given)
    return result.summary["samples_per_sec"] or 0.0, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--stored", type=int, default=128, help="side of the stored PNGs (28: MNIST's)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the training process in every row (default: as local mode decides)")
    a = ap.parse_args()
    pngs, decoded, labels = make_images(a.images, a.stored)
    base = {"train": {"epochs": a.epochs, "batch_size": 64, "log_every": 0}, "data": {"eval_fraction": 0.1},
            "threads": a.threads}
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "decoded.npz"
        np.savez(npz, x=decoded, y=labels)
        rows = {ARRAY: lambda: train({**base, "data": {**base["data"], "name": "npz",
                                                                              "path": str(npz)}})}
        for w in (0, 1, 2):
            rows[f"PNG dataset, data.workers={w}"] = (
                lambda w=w: train({**base, "data": {**base["data"], "workers": w}}, data=PngImages(pngs, labels)))
        got = {name: [] for name in rows}
        for _ in range(a.reps):
            for name, fn in rows.items():
                got[name].append(fn())
    print(f"\n{a.images} images {a.stored}x{a.stored} PNG -> decode, resize to {SIZE}x{SIZE}, random {CROP}x{CROP} crop "
          f"+ flip; LeNet, batch 64, {a.epochs} epochs, local mode, {device.host_cores()} cores; median of {a.reps}\n")
    print("| data | samples/s | wall s | vs 0 workers | vs pre-decoded |\n|---|---|---|---|---|")
    zero = statistics.median(r[0] for r in got["PNG dataset, data.workers=0"])
    array = statistics.median(r[0] for r in got[ARRAY])
    for name, runs in got.items():
        rate = statistics.median(r[0] for r in runs)
        print(f"| {name} | {rate:,.0f} | {statistics.median(r[1] for r in runs):.1f} | {rate / zero:.2f}x "
              f"| {rate / array:.2f}x |")


if __name__ == "__main__":
    main()
