"""The Spark data feed: a source of rows (a DataFrame, Parquet read by Spark, or a dataset
the driver holds) checked on the driver, cut into the N shards, and a shard spooled to
its task's local disk; or, for a built-in dataset or a user's, only a row a task, each
task making the data itself.

Rows get a global index `__row` (the source's row order) and the key of their shard,
[r*n/N, (r+1)*n/N) (DESIGN.md invariant 1); `repartition(N, key)` moves shard r to
partition r (the keys are chosen so that Spark's hash of key r is r), and the barrier
stage's task r reads it as Arrow batches, writing each into a memory-mapped file on the
executor's disk (data/spool.py): no shard has to fit in the Python heap. DataFrame APIs
only (a classic session is asked its partitions' count through df.rdd, to skip a
shuffle), so the same code runs over Spark Connect, which has no RDDs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ... import data
from ...data import sharding, spool
from ...data.worker import head_hash
from ...errors import DataError, first_line
from ...train import validate

ROW, KEY, BLOB = "__row", "__key", "__blob"
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
    made: str | None = None  # a built-in dataset each task makes from the config: the driver's hash of its head


def dataset_source(cfg, ds: data.Dataset, outputs: int) -> Source:
    """A dataset the driver already holds (an .npz; a built-in one: builtin_source): cut on
    the driver into the N shards, each shipped to its task by Spark. No DataFrame round
    trip: the rows are already here, and a DataFrame would only add a conversion and a
    shuffle (~6 s for 60 MB here). For data larger than the driver's memory use Parquet,
    read on the executors."""
    if ds.y.ndim != 1:
        raise DataError(f"{ds.name}: the Spark launcher takes one label per row; targets of shape "
                        f"{list(ds.y.shape[1:])} per row need the local or MPI launcher")
    return Source(None, len(ds), "label", ["features"], ds.sample_shape, outputs, ds.y.dtype.kind, dataset=ds)


def builtin_source(cfg, ds: data.Dataset, outputs: int) -> Source:
    """A built-in dataset (xor, perceptron, digits, synthetic: made from the package and
    the config): each task makes it as an MPI rank does, so no rows travel (bench_mlp's
    63 MB: ~1.5 s of start-up); a task whose rows' head differs from the driver's (another
    numpy's random streams) says so and stops."""
    return replace(dataset_source(cfg, ds, outputs), dataset=None, made=head_hash(ds.x, ds.y))


def items_source(items: data.Items) -> Source:
    """A user's dataset (checked on the driver): no rows travel, each task makes the
    dataset itself (data.target, or the object, pickled) and asks it for its shard's rows."""
    return Source(None, items.n, "label", [], items.sample_shape, items.outputs, items=True)


def dataframe_source(cfg, df, name: str = "dataframe", files: list[Path] | None = None) -> Source:
    """Any DataFrame, checked on the driver (one query) so that a bad one is refused before
    the barrier stage. Its row order is partition by partition, row by row; a Parquet read
    is ordered file by file (path order), as the MPI and local launchers read it."""
    from pyspark.sql import functions as F

    label = cfg.data.label_column
    if label not in df.columns:
        raise DataError(f"{name}: no label column {label!r} (columns: {', '.join(df.columns)})")
    features = data.feature_columns(df.columns, label, name)
    df, kinds = _numeric_labels(_vectors_as_arrays(df, features), label, name)
    array = len(features) == 1 and kinds[features[0]].startswith("array")
    _check_feature_types(kinds, features, array, name)
    if ROW not in df.columns:
        df = with_row_index(df, files)
    y = F.col(label)
    if array:
        col = F.col(features[0])
        null_features = col.isNull() | F.exists(col, lambda v: v.isNull())
        sizes = [F.min(F.size(col)).alias("w_lo"), F.max(F.size(col)).alias("w_hi")]
    else:
        null_features = F.lit(False)
        for c in features:
            null_features = null_features | F.col(c).isNull()
        sizes = [F.lit(len(features)).alias("w_lo"), F.lit(len(features)).alias("w_hi")]
    stats = df.agg(F.count(F.lit(1)).alias("n"), F.min(y).alias("lo"), F.max(y).alias("hi"),
                   F.sum(F.when(y.isNull(), 1).otherwise(0)).alias("null_labels"),
                   F.sum(F.when(null_features, 1).otherwise(0)).alias("null_features"),
                   F.sum(F.when(y.isin(0, 1), 0).otherwise(1)).alias("nonbinary"),
                   F.sum(F.when(y == F.floor(y), 0).otherwise(1)).alias("fractional"), *sizes).first()
    n = int(stats["n"])
    if stats["null_labels"]:
        raise DataError(f"{name}: label column {label!r} has {stats['null_labels']} null rows (drop or fill them first)")
    if stats["null_features"]:
        where = f"feature column {features[0]!r}" if len(features) == 1 else "the feature columns"
        raise DataError(f"{name}: {where} hold nulls in {stats['null_features']} rows (drop or fill them first)")
    if n and stats["w_lo"] != stats["w_hi"]:
        raise DataError(f"{name}: feature column {features[0]!r} holds arrays of different lengths "
                        f"({stats['w_lo']} to {stats['w_hi']}); every row needs the same number of features")
    width = int(stats["w_lo"] or 0)
    # whole numbers, stored as integers or floats, are class ids (data.class_ids, as files are read)
    label_kind = "i" if kinds[label] in NUMERIC[2:] or not stats["fractional"] else "f"
    st = validate.DataStats(name, n, (width,), label_kind, float(stats["lo"] or 0),
                            float(stats["hi"] or 0), 1, not stats["nonbinary"])
    return Source(df, n, label, features, (width,), validate.check_stats(cfg, st), label_kind)


def _vectors_as_arrays(df, features: list[str]):
    """A Spark ML Vector feature column (what VectorAssembler makes) as an array<float> column."""
    kinds = dict(df.dtypes)
    if len(features) == 1 and kinds[features[0]] == "vector":
        from pyspark.ml.functions import vector_to_array

        return df.withColumn(features[0], vector_to_array(features[0], "float32"))
    return df


def _numeric_labels(df, label: str, name: str):
    kinds = dict(df.dtypes)
    if kinds[label] == "boolean":
        df, kinds[label] = df.withColumn(label, df[label].cast("int")), "int"
    elif kinds[label] not in NUMERIC and not kinds[label].startswith("decimal"):
        what = "strings" if kinds[label] == "string" else kinds[label]
        raise DataError(f"{name}: label column {label!r} holds {what}; labels must be numbers (class ids "
                        f"0..K-1, or targets): encode them first (e.g. pyspark.ml.feature.StringIndexer)")
    return df, kinds


def _check_feature_types(kinds: dict, features: list[str], array: bool, name: str) -> None:
    if array:
        inner = kinds[features[0]][len("array<"):-1]
        if inner not in NUMERIC and not inner.startswith("decimal"):
            raise DataError(f"{name}: feature column {features[0]!r} is {kinds[features[0]]}; it must hold numbers "
                            f"(an array of numbers, a Spark ML Vector, or numeric columns)")
        return
    bad = [c for c in features if kinds[c] not in NUMERIC and not kinds[c].startswith("decimal")]
    if bad:
        raise DataError(f"{name}: feature column {bad[0]!r} is not numeric ({kinds[bad[0]]}); the features are "
                        f"one array or Vector column, or numeric columns")


def with_row_index(df, files: list[Path] | None = None):
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
    for pid in range(max(counts, default=-1) + 1):  # partitions past the last non-empty one start nothing
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
    data.check_parquet_schemas(files)  # Spark would read a mismatched file as nulls
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


# ---------------------------------------------------------------- the shards


def partition_keys(world: int) -> list[int]:
    """keys[r]: the smallest int whose Spark hash puts it in partition r of
    `repartition(world, key)` (HashPartitioning is pmod(murmur3(key), world), the `hash`
    function's). Computed here, not asked of Spark (a job: ~0.9 s of a job's start);
    tests/test_spark.py checks it against Spark's own hash, and a key that went astray
    would be named by the task that got another shard's rows."""
    found: dict[int, int] = {}
    k = 0
    while len(found) < world:
        found.setdefault(spark_hash_int(k) % world, k)  # Python's % is pmod
        k += 1
    return [found[r] for r in range(world)]


def spark_hash_int(value: int, seed: int = 42) -> int:
    """Spark's `hash(int)`: Murmur3_x86_32.hashInt(value, 42), as a signed 32-bit int."""
    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (32 - r))) & 0xFFFFFFFF

    k1 = rotl((value & 0xFFFFFFFF) * 0xCC9E2D51 & 0xFFFFFFFF, 15) * 0x1B873593 & 0xFFFFFFFF
    h1 = (rotl(seed ^ k1, 13) * 5 + 0xE6546B64) & 0xFFFFFFFF
    h1 ^= 4  # the length in bytes
    h1 = (h1 ^ (h1 >> 16)) * 0x85EBCA6B & 0xFFFFFFFF
    h1 = (h1 ^ (h1 >> 13)) * 0xC2B2AE35 & 0xFFFFFFFF
    h1 ^= h1 >> 16
    return h1 - (1 << 32) if h1 & 0x80000000 else h1


def shard(spark, source: Source, world: int):
    """A DataFrame of `world` partitions, partition r holding shard r: its rows (a DataFrame
    source), one Arrow IPC blob of them (a dataset the driver holds), or nothing (a user's
    dataset, which each task makes itself)."""
    from pyspark.sql import functions as F

    if source.items or source.made:  # each task makes its data: a row a task, partition r the r-th (no shuffle)
        return spark.range(0, world, 1, numPartitions=world)
    keys = partition_keys(world)
    if source.dataset is not None:
        blobs = [(keys[r], _ipc(to_arrow(source.dataset, *sharding.shard_range(source.n, world, r))))
                 for r in range(world)]
        df = spark.createDataFrame(blobs, f"{KEY} int, {BLOB} binary")
        if _partitions(df) == world:  # local rows are sliced defaultParallelism ways: with `world` of them,
            return df  # a row a partition, in order; no shuffle (a session's first costs ~1 s); tasks check their rows
    else:
        part = F.expr(f"int((({ROW} + 1) * {world} - 1) div {source.n})")  # r with r*n//N <= row < (r+1)*n//N
        key = F.array(*[F.lit(k) for k in keys])[part]
        df = source.df.select(ROW, *source.feature_columns, source.label_column, key.alias(KEY))
    return df.repartition(world, KEY)


def _partitions(df) -> int | None:
    """The partitions `df` would scan as, without running a job; None over Spark Connect
    (no RDD there), where the repartition stays."""
    try:
        return df.rdd.getNumPartitions()
    except Exception:  # noqa: BLE001 - Spark Connect: PySparkNotImplementedError
        return None


def spool_shard(rank: int, world: int, batches, source: Source, cache_dir: str | None = None,
                resident: int = spool.RESIDENT_BYTES, window: int = 0) -> data.WorkerData:
    """Executor side: this task's shard, rows [lo, hi), written batch by batch into a spool
    on the executor's local disk (row i at position i - lo: no sort, no copy in the heap)."""
    import pyarrow as pa

    lo, hi = sharding.shard_range(source.n, world, rank)
    width = int(np.prod(source.sample_shape))
    x = spool.spool((hi - lo, width), np.float32, spool.spool_dir(cache_dir))
    y = np.zeros(hi - lo, np.int64 if source.label_kind in "iu" else np.float32)
    seen = np.zeros(hi - lo, np.uint8)
    pager = spool.Pager(x)
    for batch in _row_batches(batches):
        if batch.num_rows == 0:
            continue
        rows = batch.column(ROW).to_numpy()
        if rows.min() < lo or rows.max() >= hi:
            raise DataError(f"partition {rank} holds rows that are not [{lo}, {hi}): is the DataFrame "
                            f"deterministic? (cache or checkpoint it first)")
        bx, by = data.table_to_arrays(batch.drop_columns([c for c in (ROW, KEY) if c in batch.schema.names]),
                                      source.label_column, f"partition {rank}")
        bad = data.find_nonfinite(bx)
        if bad is not None:
            raise DataError(f"row {rows[bad]} holds NaN or Inf")
        x[rows - lo], y[rows - lo] = bx.reshape(len(bx), width), by
        np.add.at(seen, rows - lo, 1)
        pager.touch()
    if not (seen == 1).all():
        raise DataError(f"partition {rank} holds rows that are not [{lo}, {hi}) each once: is the DataFrame "
                        f"deterministic? (cache or checkpoint it first)")
    pager.release()
    pa.default_memory_pool().release_unused()  # the batches' buffers: back to the system, not kept by the pool
    return data.WorkerData(x.reshape(hi - lo, *source.sample_shape), y, source.n, source.outputs, offset=lo,
                           resident=resident, window=window)


def _row_batches(batches):
    """The record batches of rows in a task's input: as they come, or out of the IPC blobs."""
    import pyarrow as pa

    for batch in batches:
        if BLOB in batch.schema.names:
            for blob in batch.column(BLOB).to_pylist():
                yield from pa.ipc.open_stream(pa.py_buffer(blob))
        elif ROW in batch.schema.names:
            yield batch
