"""Which rows a worker trains on, and in what order: pure functions, no state.

Everything here is a function of (dataset size n, seed, epoch, rank, world size,
batch size), so every launcher derives the same plan without talking, a resumed run
continues the same order, and there is no `set_epoch` to forget.

- Held-out rows: row i is for evaluation when a seeded hash of i falls below
  `eval_fraction`. Being per row, Spark tasks decide it for their own partition.
- Shard r: the rows whose index falls in [r*n/N, (r+1)*n/N) (DESIGN.md invariant 1),
  minus the held-out rows.
- Sizes: each step's global sample count, `step_samples`, follows from the shard sizes
  alone, so every worker scales its loss by the same 1 / count before backward.
- Order: `sampling="shard"`: each worker permutes its own shard with
  rng(seed, epoch, rank) and takes its share of the global batch each step.
  `sampling="global"`: one permutation of all training rows with rng(seed, epoch, 0);
  step s is the global batch perm[s*B:(s+1)*B] and worker r takes its slice of it, so
  the union of the local batches is exactly local mode's batch. With N = 1 the two
  modes are the same function.
- Windows (`data.shuffle_window` W > 0): the rows to permute are cut into windows of W
  consecutive rows; the windows are visited in a permuted order and each is permuted
  within itself, so an epoch reads its rows one span of about W rows at a time (a shard
  on disk larger than memory: WorkerData reads the next window ahead, sequentially).
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as intended
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def is_eval(index: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """Boolean mask: which of these global row indices are held out for evaluation."""
    index = np.asarray(index, dtype=np.uint64)
    if fraction <= 0:
        return np.zeros(index.shape, dtype=bool)
    with np.errstate(over="ignore"):
        h = _splitmix64(index ^ _splitmix64(np.uint64(seed) * _GOLDEN))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53)) < fraction


def shard_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [lo, hi) of shard `rank`: sizes differ by at most one, none is skipped."""
    return rank * n // world, (rank + 1) * n // world


def split_rows(lo: int, hi: int, seed: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Global indices in [lo, hi), split into (training rows, held-out rows)."""
    index = np.arange(lo, hi, dtype=np.int64)
    held = is_eval(index, seed, fraction)
    return index[~held], index[held]


def local_share(total: int, world: int, rank: int) -> int:
    """This worker's part of `total` samples: shares differ by at most one and sum to total."""
    return (rank + 1) * total // world - rank * total // world


def epoch_batches(*, n: int, seed: int, epoch: int, rank: int, world: int, batch_size: int,
                  eval_fraction: float, sampling: str, shuffle: bool, window: int = 0) -> list[np.ndarray]:
    """The global row indices of this worker's local batch at each step of `epoch`.

    Workers may get different numbers of steps (uneven shards, `shard` sampling); the
    training loop keeps everyone in step, contributing zeros once a shard is used up.
    """
    if sampling == "global":
        train, _ = split_rows(0, n, seed, eval_fraction)
        order = _permute(train, seed, epoch, 0, shuffle, window)
        batches = []
        for start in range(0, len(order), batch_size):
            g = order[start:start + batch_size]
            batches.append(g[rank * len(g) // world:(rank + 1) * len(g) // world])
        return batches
    if sampling != "shard":
        raise ValueError(f"unknown sampling {sampling!r}")
    train, _ = split_rows(*shard_range(n, world, rank), seed, eval_fraction)
    order = _permute(train, seed, epoch, rank, shuffle, window)
    local_batch = local_share(batch_size, world, rank)
    return [order[i:i + local_batch] for i in range(0, len(order), local_batch)]


def eval_rows(n: int, seed: int, eval_fraction: float, rank: int, world: int) -> np.ndarray:
    """The held-out rows this worker evaluates: its shard's, so each is scored once.

    With no held-out rows (eval_fraction 0) the training rows are evaluated instead.
    """
    train, held = split_rows(*shard_range(n, world, rank), seed, eval_fraction)
    return held if eval_fraction > 0 else train


def _permute(rows: np.ndarray, seed: int, epoch: int, rank: int, shuffle: bool, window: int = 0) -> np.ndarray:
    """The rows in this epoch's order: one permutation of them all, or (`window` > 0) their
    windows of `window` consecutive rows in a permuted order, each permuted within itself.
    A window as large as the rows is the plain permutation."""
    if not shuffle:
        return rows
    rng = np.random.default_rng([seed, epoch, rank])
    if not window or window >= len(rows):
        return rng.permutation(rows)
    starts = rng.permutation(np.arange(0, len(rows), window))
    return np.concatenate([rng.permutation(rows[s:s + window]) for s in starts.tolist()])


def train_rows_per_shard(n: int, world: int, seed: int, eval_fraction: float, chunk: int = 1 << 22) -> np.ndarray:
    """How many training rows (not held out) each shard holds."""
    counts = np.zeros(world, dtype=np.int64)
    for r in range(world):
        lo, hi = shard_range(n, world, r)
        held = 0
        for start in range(lo, hi, chunk):  # bounded memory for a source of any size
            held += int(is_eval(np.arange(start, min(start + chunk, hi), dtype=np.int64), seed, eval_fraction).sum())
        counts[r] = hi - lo - held
    return counts


def step_samples(*, n: int, seed: int, world: int, batch_size: int, accumulate: int, eval_fraction: float,
                 sampling: str) -> np.ndarray:
    """Samples in the global batch of each optimizer step of an epoch (every epoch alike:
    the order changes, the sizes do not). So every worker knows each step's global count,
    and with it the factor that turns its summed loss into its share of the mean, before
    backward and without asking anyone. Its length is the steps of an epoch: the most any
    worker takes (the others join with zeros)."""
    trained = train_rows_per_shard(n, world, seed, eval_fraction)
    if sampling == "global":  # slices of one permutation: global batches of batch_size, the last one short
        total = int(trained.sum())
        micro = np.minimum(batch_size, total - np.arange(-(-total // batch_size)) * batch_size)
    else:  # worker r takes batches of local_share(...) of its shard, the last one short
        shares = np.array([local_share(batch_size, world, r) for r in range(world)], dtype=np.int64)
        full, rest = trained // shares, trained % shares
        length = int((full + (rest > 0)).max()) if world else 0
        micro = np.zeros(length + 2, dtype=np.int64)
        np.add.at(micro, 0, shares.sum())  # difference array: shares[r] on [0, full[r]), rest[r] at full[r]
        np.add.at(micro, full, rest - shares)
        np.add.at(micro, full + 1, -rest)
        micro = np.cumsum(micro)[:length]
    steps = -(-len(micro) // accumulate)
    return np.add.reduceat(micro, np.arange(0, steps * accumulate, accumulate)) if steps else micro[:0]
