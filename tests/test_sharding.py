"""Sharding is a pure function: disjoint, covering, stable per epoch, new per epoch."""

import numpy as np
import pytest

from dist_train.data import sharding

CASES = [(n, w) for n in (1, 2, 7, 10, 97, 1000) for w in (1, 2, 3, 4, 7)]


def plan(n, w, r, epoch=0, sampling="shard", frac=0.2, batch=8, shuffle=True, seed=3):
    return sharding.epoch_batches(n=n, seed=seed, epoch=epoch, rank=r, world=w, batch_size=batch,
                                  eval_fraction=frac, sampling=sampling, shuffle=shuffle)


@pytest.mark.parametrize("n,w", CASES)
def test_shard_ranges_partition_the_rows(n, w):
    ranges = [sharding.shard_range(n, w, r) for r in range(w)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("sampling", ["shard", "global"])
@pytest.mark.parametrize("n,w", CASES)
def test_every_training_row_once_per_epoch(n, w, sampling):
    train, held = sharding.split_rows(0, n, 3, 0.2)
    seen = np.concatenate([b for r in range(w) for b in plan(n, w, r, sampling=sampling)] or [np.zeros(0, int)])
    assert sorted(seen.tolist()) == train.tolist()  # disjoint and covering, no padding, no truncation
    assert not set(seen.tolist()) & set(held.tolist())


@pytest.mark.parametrize("sampling", ["shard", "global"])
def test_same_epoch_same_order_other_epoch_other_order(sampling):
    a = [np.concatenate(plan(500, 3, r, epoch=2, sampling=sampling)) for r in range(3)]
    b = [np.concatenate(plan(500, 3, r, epoch=2, sampling=sampling)) for r in range(3)]
    c = [np.concatenate(plan(500, 3, r, epoch=3, sampling=sampling)) for r in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(not np.array_equal(x, z) for x, z in zip(a, c))


def test_shard_mode_keeps_each_worker_on_its_fixed_shard():
    for epoch in range(3):
        for r in range(3):
            lo, hi = sharding.shard_range(500, 3, r)
            rows = np.concatenate(plan(500, 3, r, epoch=epoch))
            assert rows.min() >= lo and rows.max() < hi


def test_global_mode_steps_are_slices_of_the_local_mode_batches():
    single = plan(101, 1, 0, epoch=1, sampling="global", batch=10)
    ranks = [plan(101, 3, r, epoch=1, sampling="global", batch=10) for r in range(3)]
    assert all(len(p) == len(single) for p in ranks)
    for step, batch in enumerate(single):
        union = np.concatenate([p[step] for p in ranks])
        assert np.array_equal(union, batch)


def test_modes_coincide_for_one_worker():
    for epoch in range(3):
        a, b = plan(77, 1, 0, epoch, "shard"), plan(77, 1, 0, epoch, "global")
        assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)


def test_local_batches_split_the_global_batch():
    assert [sharding.local_share(10, 3, r) for r in range(3)] == [3, 3, 4]
    assert sum(sharding.local_share(128, 5, r) for r in range(5)) == 128


def test_eval_rows_each_scored_once_and_match_the_held_out_split():
    n = 1000
    _, held = sharding.split_rows(0, n, 5, 0.25)
    parts = [sharding.eval_rows(n, 5, 0.25, r, 4) for r in range(4)]
    assert sorted(np.concatenate(parts).tolist()) == held.tolist()
    assert 150 < len(held) < 350  # about a quarter, decided per row


def test_held_out_rows_depend_on_the_seed_only_and_are_computable_per_row():
    idx = np.arange(10_000)
    whole = sharding.is_eval(idx, 9, 0.3)
    pieces = np.concatenate([sharding.is_eval(idx[i:i + 777], 9, 0.3) for i in range(0, 10_000, 777)])
    assert np.array_equal(whole, pieces)
    assert not np.array_equal(whole, sharding.is_eval(idx, 10, 0.3))


def test_no_shuffle_keeps_row_order():
    rows = np.concatenate(plan(50, 2, 1, shuffle=False, frac=0))
    assert rows.tolist() == list(range(25, 50))


def windowed(n, w, r, window, epoch=0, sampling="shard", frac=0.2, batch=8):
    return sharding.epoch_batches(n=n, seed=3, epoch=epoch, rank=r, world=w, batch_size=batch, eval_fraction=frac,
                                  sampling=sampling, shuffle=True, window=window)


@pytest.mark.parametrize("sampling", ["shard", "global"])
@pytest.mark.parametrize("n,w,window", [(97, 1, 10), (1000, 3, 64), (1000, 4, 7), (50, 2, 1)])
def test_a_shuffle_window_visits_every_row_once_a_window_at_a_time(n, w, window, sampling):
    """data.shuffle_window: the same rows as the plain shuffle, each once; the order goes
    through windows of `window` consecutive training rows, one after another, in an order
    that changes by epoch; deterministic."""
    for epoch in (0, 1):
        mine = [windowed(n, w, r, window, epoch, sampling) for r in range(w)]
        plain = [plan(n, w, r, epoch, sampling) for r in range(w)]
        pairs = zip(mine, plain) if sampling == "shard" else [(sum(mine, []), sum(plain, []))]  # global: all ranks'
        for got, ref in pairs:
            assert sorted(np.concatenate(got).tolist()) == sorted(np.concatenate(ref).tolist())
        assert [[b.tolist() for b in m] for m in mine] == [[b.tolist() for b in windowed(n, w, r, window, epoch,
                                                                                          sampling)] for r in range(w)]
    train = (sharding.split_rows(0, n, 3, 0.2)[0] if sampling == "global"
             else sharding.split_rows(*sharding.shard_range(n, w, 0), 3, 0.2)[0])
    window_of = {row: i // window for i, row in enumerate(train.tolist())}
    order = np.concatenate(windowed(n, w, 0, window, 0, sampling)).tolist()
    if sampling == "global":
        order = np.concatenate([np.concatenate([windowed(n, w, r, window, 0, sampling)[s] for r in range(w)])
                                for s in range(len(windowed(n, w, 0, window, 0, sampling)))]).tolist()
    seen = [window_of[row] for row in order]
    runs = [k for i, k in enumerate(seen) if i == 0 or k != seen[i - 1]]
    assert len(runs) == len(set(runs)) == -(-len(train) // window)  # each window entered once
    assert runs != sorted(runs) or len(runs) < 3
    assert order != sorted(order)  # shuffled within the windows too


def test_a_window_as_large_as_the_rows_is_the_plain_shuffle():
    for sampling in ("shard", "global"):
        assert [b.tolist() for b in windowed(100, 2, 1, 10**6, sampling=sampling)] == \
               [b.tolist() for b in plan(100, 2, 1, sampling=sampling)]
