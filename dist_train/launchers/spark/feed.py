"""The Spark data feed: a source of rows (a DataFrame, Parquet read by Spark, or a dataset
the driver holds) cut into the N shards, and a shard assembled into arrays in its task.

Rows get a global index `__row` (the source's row order); each source partition slices
its Arrow batches by destination shard, [r*n/N, (r+1)*n/N) (DESIGN.md invariant 1); the
slices travel as Arrow IPC blobs to partition r, where the task turns them into arrays
without a per-row Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ... import data
from ...data import sharding
from ...errors import DataError, first_line
from ...train import validate

ROW = "__row"
NUMERIC = ("float", "double", "int", "bigint", "smallint", "tinyint")


@dataclass
class Source:
    """The rows to train on, and what the driver knows of them: either a DataFrame with a
    `__row` index column, or a dataset the driver already holds in memory."""

    df: object  # pyspark.sql.DataFrame, or None for a driver-held dataset
    n: int
    label_column: str
    feature_columns: list[str]
    sample_shape: tuple[int, ...]
    outputs: int
    label_kind: str = "i"  # "i": class ids, "f": float targets (decided from every row, on the driver)
    dataset: data.Dataset | None = None
    items: bool = False  # a user's map-style dataset: each task makes its own and asks it for its rows


def dataset_source(cfg, ds: data.Dataset, outputs: int) -> Source:
    """A dataset the driver already holds (built-in or .npz): cut on the driver into the N
    shards, each shipped to its task by Spark. No DataFrame round trip: the rows are
    already here, and a DataFrame would only add a conversion and a shuffle (~6 s for
    60 MB here). For data larger than the driver's memory use Parquet, read on the executors."""
    if ds.y.ndim != 1:
        raise DataError(f"{ds.name}: the Spark launcher takes one label per row; targets of shape "
                        f"{list(ds.y.shape[1:])} per row need the local or MPI launcher")
    return Source(None, len(ds), "label", ["features"], ds.sample_shape, outputs, ds.y.dtype.kind, dataset=ds)


def items_source(items: data.Items) -> Source:
    """A user's dataset (checked on the driver): no rows travel, each task makes the
    dataset itself (data.target, or the object, pickled) and asks it for its shard's rows."""
    return Source(None, items.n, "label", [], items.sample_shape, items.outputs, items=True)


def dataframe_source(cfg, df, name: str = "dataframe", files: list[Path] | None = None) -> Source:
    """Any DataFrame: its row order is partition by partition, row by row; a Parquet read
    is ordered file by file (path order), as the MPI and local launchers read it."""
    from pyspark.sql import functions as F

    label = cfg.data.label_column
    if label not in df.columns:
        raise DataError(f"{name}: no label column {label!r} (columns: {', '.join(df.columns)})")
    features = data.feature_columns(df.columns, label, name)
    if ROW not in df.columns:
        df = _with_row_index(df, files)
    stats = df.agg(F.count(F.lit(1)).alias("n"), F.min(label).alias("lo"), F.max(label).alias("hi"),
                   F.sum(F.when(F.col(label).isin(0, 1), 0).otherwise(1)).alias("nonbinary"),
                   F.sum(F.when(F.col(label) == F.floor(F.col(label)), 0).otherwise(1)).alias("fractional")).first()
    kinds = dict(df.dtypes)
    if len(features) == 1 and kinds[features[0]].startswith("array"):
        first = df.select(F.size(features[0]).alias("w")).first()
        width = int(first["w"]) if first else 0
    else:
        bad = [c for c in features if kinds[c] not in NUMERIC]
        if bad:
            raise DataError(f"{name}: feature column {bad[0]!r} is not numeric ({kinds[bad[0]]})")
        width = len(features)
    # whole numbers, stored as integers or floats, are class ids (data.class_ids, as files are read)
    label_kind = "i" if kinds[label] in NUMERIC[2:] or not stats["fractional"] else "f"
    st = validate.DataStats(name, int(stats["n"]), (width,), label_kind, float(stats["lo"] or 0),
                            float(stats["hi"] or 0), 1, not stats["nonbinary"])
    return Source(df, int(stats["n"]), label, features, (width,), validate.check_stats(cfg, st), label_kind)


def _with_row_index(df, files: list[Path] | None = None):
    """Add __row: for a Parquet read of `files`, file by file in that order, then row in file;
    else partition order."""
    from pyspark.sql import functions as F

    if files is not None:
        meta = df.select("*", F.col("_metadata.file_path").alias("__file"),
                         F.col("_metadata.row_index").alias("__in_file"))
        counts = {_local_path(r["__file"]): (r["__file"], r["count"]) for r in meta.groupBy("__file").count().collect()}
        offsets, total = {}, 0
        for f in files:  # data.parquet_files' order, the one the other launchers read in
            uri, count = counts.get(str(Path(f).resolve()), (None, 0))
            if uri is not None:
                offsets[uri], total = total, total + count
        offset = F.create_map(*[x for k, v in offsets.items() for x in (F.lit(k), F.lit(v))])
        return meta.withColumn(ROW, offset[F.col("__file")] + F.col("__in_file")).drop("__file", "__in_file")
    with_pid = df.withColumn("__pid", F.spark_partition_id())
    counts = {r["__pid"]: r["count"] for r in with_pid.groupBy("__pid").count().collect()}
    starts, total = [], 0
    for pid in range(df.rdd.getNumPartitions()):
        starts.append(total)
        total += counts.get(pid, 0)
    # monotonically_increasing_id: partition id in the upper 31 bits, position in the lower 33 (documented)
    position = F.monotonically_increasing_id().bitwiseAND(F.lit((1 << 33) - 1))
    start = F.array(*[F.lit(s) for s in starts or [0]])[F.spark_partition_id()]
    return df.withColumn(ROW, start + position)


def _local_path(uri: str) -> str:
    """'file:/tmp/a.parquet' or 'file:///tmp/a.parquet' -> '/tmp/a.parquet'."""
    from urllib.parse import unquote, urlparse

    return str(Path(unquote(urlparse(uri).path)).resolve())


def parquet_source(spark, cfg) -> Source:
    files = data.parquet_files(cfg.data.path)  # same file list and order as the other launchers
    try:
        df = spark.read.parquet(*[str(Path(f).resolve()) for f in files])
        df.schema  # noqa: B018 - reading the footer: a corrupt file fails here
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{cfg.data.path}: not a readable Parquet file ({first_line(e, 300)})") from None
    return dataframe_source(cfg, df, name=str(cfg.data.path), files=files)


def to_arrow(ds: data.Dataset, lo: int, hi: int):
    """Rows [lo, hi) as an Arrow record batch: __row, features (list<float>), label."""
    import pyarrow as pa

    width = int(np.prod(ds.sample_shape))
    flat = np.ascontiguousarray(ds.x[lo:hi]).reshape(hi - lo, width)
    offsets = pa.array(np.arange(hi - lo + 1, dtype=np.int32) * width)
    features = pa.ListArray.from_arrays(offsets, pa.array(flat.reshape(-1)))
    return pa.record_batch({ROW: np.arange(lo, hi, dtype=np.int64), "features": features,
                            "label": np.ascontiguousarray(ds.y[lo:hi])})


def _ipc(batch) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def shard(spark, source: Source, world: int):
    """An RDD of `world` partitions; partition r holds shard r as (r, Arrow IPC blob) pairs
    (none for a user's dataset, which each task reads itself)."""
    if source.items:
        return spark.sparkContext.parallelize([(r, b"") for r in range(world)], world)
    if source.dataset is not None:
        blobs = [(r, _ipc(to_arrow(source.dataset, *sharding.shard_range(source.n, world, r)))) for r in range(world)]
        return spark.sparkContext.parallelize(blobs, world)  # one element per partition, in order
    columns = [ROW, *source.feature_columns, source.label_column]
    sliced = source.df.select(*columns).mapInArrow(_Slicer(source.n, world), "part int, blob binary")
    return sliced.rdd.map(lambda row: (row[0], row[1])).partitionBy(world, lambda part: part)


class _Slicer:
    """Executor side: cut each Arrow batch by destination shard (vectorised)."""

    def __init__(self, n: int, world: int):
        self.n, self.world = n, world

    def __call__(self, batches):
        import pyarrow as pa

        for batch in batches:
            if batch.num_rows == 0:
                continue
            rows = batch.column(ROW).to_numpy()
            part = ((rows + 1) * self.world - 1) // self.n  # r with r*n//N <= row < (r+1)*n//N
            for r in np.unique(part):
                blob = _ipc(batch.filter(pa.array(part == r)))
                yield pa.record_batch({"part": pa.array([int(r)], pa.int32()), "blob": pa.array([blob], pa.binary())})


def assemble(rank: int, world: int, pieces, source: Source) -> data.WorkerData:
    """Executor side: this task's shard, rows [lo, hi), from the Arrow blobs of its partition."""
    import pyarrow as pa

    n, sample_shape = source.n, source.sample_shape
    lo, hi = sharding.shard_range(n, world, rank)
    batches = [b for _, blob in pieces for b in pa.ipc.open_stream(pa.py_buffer(blob))]
    if batches:
        table = pa.Table.from_batches(batches)
        table = table.take(pa.array(np.argsort(table.column(ROW).to_numpy(), kind="stable")))
        rows = table.column(ROW).to_numpy()
        x, y = data.table_to_arrays(table.drop_columns([ROW]), source.label_column, f"partition {rank}")
    else:
        rows, x, y = np.zeros(0, np.int64), np.zeros((0, int(np.prod(sample_shape))), np.float32), np.zeros(0, np.int64)
    if not np.array_equal(rows, np.arange(lo, hi)):
        raise DataError(f"partition {rank} holds rows that are not [{lo}, {hi}): is the DataFrame "
                        f"deterministic? (cache or checkpoint it first)")
    bad = data.find_nonfinite(x)
    if bad is not None:
        raise DataError(f"row {lo + bad} holds NaN or Inf")
    x = np.ascontiguousarray(x.reshape(len(x), *sample_shape))
    y = y.astype(np.int64 if source.label_kind in "iu" else np.float32, copy=False)
    return data.WorkerData(x, y, n, source.outputs, offset=lo)
