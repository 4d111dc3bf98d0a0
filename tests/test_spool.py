"""Bounded memory: spools (arrays in unlinked, memory-mapped files on local disk) leave
nothing behind and give their pages back; Parquet read batch by batch into a spool trains
exactly what the same rows held in memory train; what cannot be features or labels is
one line naming the column."""

import os

import numpy as np
import torch
import pytest

import dist_train
from dist_train import data
from dist_train.data import spool
from dist_train.errors import DataError


def resident_kb() -> int:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0])


def test_a_spool_leaves_no_file_and_gives_its_pages_back(tmp_path):
    x = spool.spool(((128 << 20) // 256, 64), np.float32, str(tmp_path))
    assert os.listdir(tmp_path) == [] and x.flags.writeable and not x[:5].any()
    before = resident_kb()
    x[:] = 1.5  # 128 MB written through the mapping
    written = resident_kb()
    assert written - before > 100_000
    spool.Pager(x).release()
    assert resident_kb() < written - 100_000  # the pages left this process ...
    assert float(x[::4096].sum()) == 1.5 * len(x[::4096]) * 64  # ... and the data stayed (page cache)


def test_a_pager_releases_beyond_its_budget_and_ignores_what_fits(tmp_path):
    x = spool.spool(((32 << 20) // 256, 64), np.float32, str(tmp_path))
    pager = spool.Pager(x, budget=8 << 20)
    x[: len(x) // 8] = 1.0  # 4 MB: within the budget
    pager.touch()
    held = resident_kb()
    x[:] = 2.0  # 32 MB
    assert resident_kb() - held > 20_000
    pager.touch()
    assert resident_kb() - held < 8_000
    assert spool.Pager(x, budget=64 << 20).maps == []  # fits whole: never released
    assert spool.Pager(np.zeros((4, 4)), budget=1).maps == []  # the heap is not ours to page


def parquet_and_npz(tmp_path, rows=1000):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(3)
    x = rng.standard_normal((rows, 6)).astype(np.float32)
    y = (x.sum(1) > 0).astype(np.int64)
    for part, lo in enumerate(range(0, rows, 300)):  # several files, and several batches per file
        pq.write_table(pa.table({"features": list(x[lo:lo + 300]), "label": y[lo:lo + 300]}),
                       tmp_path / f"part-{part}.parquet", row_group_size=64)
    np.savez_compressed(tmp_path / "rows.npz", x=x, y=y)  # compressed: read into the heap
    return x, y


def test_parquet_spooled_trains_exactly_what_the_rows_in_memory_train(tmp_path, monkeypatch):
    x, y = parquet_and_npz(tmp_path)
    monkeypatch.setattr(data.sources, "PARQUET_BATCH_ROWS", 50)
    ds = data.load_parquet(tmp_path, "label", cache_dir=str(tmp_path / "cache"))
    assert spool.mapping(ds.x) is not None and os.listdir(tmp_path / "cache") == []
    assert np.array_equal(ds.x, x) and np.array_equal(ds.y, y)
    base = {"model": {"name": "mlp", "hidden": [8]}, "train": {"epochs": 3, "batch_size": 32, "log_every": 0},
            "threads": 1}
    spooled = dist_train.fit({**base, "data": {"name": "parquet", "path": str(tmp_path)}})
    memory = dist_train.fit({**base, "data": {"name": "npz", "path": str(tmp_path / "rows.npz")}})
    for k, v in spooled.state_dict.items():
        assert np.array_equal(v.numpy(), memory.state_dict[k].numpy()), k


def test_a_shuffle_window_trains_the_same_from_a_spool_and_from_memory_and_differs_from_the_plain_order(tmp_path):
    """data.shuffle_window: the spool reads each next window ahead, the rows in memory do
    not; the order is the same function of the config, so are the weights."""
    parquet_and_npz(tmp_path)
    base = {"model": {"name": "mlp", "hidden": [8]}, "train": {"epochs": 2, "batch_size": 32, "log_every": 0},
            "threads": 1}
    runs = {}
    for name, window in (("parquet", 100), ("npz", 100), ("plain", 0)):
        source = {"name": "npz", "path": str(tmp_path / "rows.npz")} if name == "npz" else {
            "name": "parquet", "path": str(tmp_path), "cache_dir": str(tmp_path / "cache"), "resident_mb": 0}
        runs[name] = dist_train.fit({**base, "data": {**source, "shuffle_window": window}}).state_dict
    for k, v in runs["parquet"].items():
        assert np.array_equal(v.numpy(), runs["npz"][k].numpy()), k
    assert any(not np.array_equal(v.numpy(), runs["plain"][k].numpy()) for k, v in runs["parquet"].items())


def test_a_windowed_feed_asks_for_each_next_window_before_it_is_reached(tmp_path, monkeypatch):
    from dist_train.data import sharding, worker

    n, window = 5000, 1000
    x = spool.spool((n, 4), np.float32, str(tmp_path))
    x[:] = np.arange(n, dtype=np.float32)[:, None]
    y = np.arange(n) % 3
    batches = sharding.epoch_batches(n=n, seed=1, epoch=0, rank=0, world=1, batch_size=50, eval_fraction=0.0,
                                     sampling="shard", shuffle=True, window=window)
    runs = worker.windows(batches, window)
    assert len(runs) == n // window
    assert sorted((lo // window, hi - lo) for _, lo, hi in runs) == [(i, window) for i in range(n // window)]
    assert worker.windows(sharding.epoch_batches(n=n, seed=1, epoch=0, rank=0, world=1, batch_size=50,
                                                 eval_fraction=0.0, sampling="shard", shuffle=True), n) == [(0, 0, n)]
    for seed in range(5):  # 4,040 training rows: a short window, batches across two windows after it
        odd = sharding.epoch_batches(n=5050, seed=seed, epoch=0, rank=0, world=1, batch_size=64, eval_fraction=0.2,
                                     sampling="shard", shuffle=True, window=window)
        got = worker.windows(odd, window)
        assert 4 <= len(got) <= 6 and all(hi - lo <= 1.25 * window / 0.8 * 1.1 for _, lo, hi in got), got
        covered = np.zeros(5050, bool)
        for _, lo, hi in got:
            covered[lo:hi] = True
        assert covered[np.concatenate(odd)].mean() > 0.95
    asked, real = [], spool.will_need
    monkeypatch.setattr(worker, "will_need", lambda a, lo, hi: (asked.append((lo, hi)), real(a, lo, hi)))
    fed = []
    for k, (count, xb, yb) in enumerate(data.WorkerData(x, y, n, 3, window=window).feed(0, batches, torch.device("cpu"))):
        fed.append(xb[:, 0].long().tolist())
        entered = next(j for j, (first, _, _) in enumerate(runs) if first <= k and
                       (j + 1 == len(runs) or runs[j + 1][0] > k))
        for _ in range(50):  # the threads that ask for the next window
            if len(asked) >= min(entered + 2, len(runs)):
                break
            __import__("time").sleep(0.01)
        spans = [(lo, hi) for _, lo, hi in runs]
        assert set(spans[:entered + 2]) <= set(asked) <= set(spans[:entered + 3])  # (gathered up to two chunks ahead)
    assert fed == [b.tolist() for b in batches]
    heap = np.zeros((10, 4), np.float32)
    spool.will_need(heap, 0, 10)  # a heap array: nothing to ask for
    spool.will_need(x, 0, n)


@pytest.mark.parametrize("n, chunk, depth", [(0, 4, 1), (3, 4, 1), (4, 4, 1), (11, 4, 1), (11, 1, 1), (11, 3, 2)])
def test_gathered_on_a_thread_in_chunks_the_items_and_their_errors_come_in_order(n, chunk, depth):
    """A file-backed shard's batches are made on a thread `chunk` at a time (one handover a
    chunk): the consumer sees the generator's items in order, and an error where it came."""
    from dist_train.data import worker

    assert list(worker._ahead_on_a_thread(iter(range(n)), depth, chunk)) == list(range(n))

    def failing():
        yield from range(n)
        raise DataError("row 7 holds NaN or Inf")

    got = []
    with pytest.raises(DataError, match="row 7"):
        for item in worker._ahead_on_a_thread(failing(), depth, chunk):
            got.append(item)
    assert got == list(range(n))


@pytest.mark.parametrize("columns, problem", [
    ({"features": [[1.0, 2.0], [3.0]], "label": [0, 1]}, "lists of different lengths (1 to 2)"),
    ({"features": [[1.0, 2.0], None], "label": [0, 1]}, "has 1 null rows"),
    ({"features": [[1.0, None], [3.0, 4.0]], "label": [0, 1]}, "1 null values inside its lists"),
    ({"features": [[[1.0]], [[2.0]]], "label": [0, 1]}, "holds lists of list<"),
    ({"a": [1.0, 2.0], "label": [0, None]}, "label column 'label' has 1 null rows"),
    ({"a": [1.0, None], "label": [0, 1]}, "feature column 'a' has 1 null rows"),
    ({"a": ["x", "y"], "label": [0, 1]}, "feature column 'a' is not numeric (string)"),
])
def test_what_cannot_be_features_or_labels_is_one_line(tmp_path, columns, problem):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), tmp_path / "bad.parquet")
    with pytest.raises(DataError) as e:
        data.load_parquet(tmp_path / "bad.parquet", "label")
    assert problem in str(e.value) and "\n" not in str(e.value)


def test_string_labels_are_classes_when_loaded_and_refused_in_a_spark_batch(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"a": [1.0, 2.0, 3.0], "label": ["dog", "cat", "dog"]})
    pq.write_table(table, tmp_path / "s.parquet")
    ds = data.load_parquet(tmp_path / "s.parquet", "label")
    assert ds.y.tolist() == [1, 0, 1] and ds.label_names == ("cat", "dog")
    with pytest.raises(DataError, match="label column 'label' holds strings; .*StringIndexer"):
        data.table_to_arrays(table, "label", "a Spark partition")  # executors cannot agree on an order alone


def test_boolean_labels_are_class_ids(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": [1.0, 2.0, 3.0], "label": [True, False, True]}), tmp_path / "b.parquet")
    assert data.load_parquet(tmp_path / "b.parquet", "label").y.tolist() == [1, 0, 1]
