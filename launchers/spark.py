"""Spark launcher: one barrier stage of `spark.workers` tasks, each fed its own partition.

    spark-submit --master 'local[2]' launchers/spark.py conf/digits.yaml --out /shared/runs/digits
    dist-train spark conf/digits.yaml --out /shared/runs/digits --master spark://host:7077

Success: the driver prints `[dist-train] spark: done ...` and exits 0; --out (a path the
driver and every executor share) holds model.pt, summary.json, metrics.jsonl and
checkpoints/. If a task fails, the job ends within seconds and the driver prints
`error: [rank R] <cause>`; with `spark.max_attempts > 1` it retries from the newest
checkpoint first.

From a notebook, inside an existing SparkSession:

    from launchers.spark import train
    result = train(spark, "conf/digits.yaml", df=my_dataframe, out_dir="/shared/runs/x")
    result.model  # the trained torch.nn.Module

How data moves: rows get a global index `__row` (the source's row order); each source
partition slices its Arrow batches by destination shard, [r*n/N, (r+1)*n/N) (DESIGN.md
invariant 1); the slices travel as Arrow IPC blobs to partition r, where the barrier task
turns them into arrays without a per-row Python loop. Gradients travel among the tasks
with torch.distributed (gloo), rendezvous through BarrierTaskContext; nothing per-step
passes through the driver. This is the only module that imports pyspark.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def session(app: str = "dist-train"):
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # local executors run this environment's Python
    return SparkSession.builder.appName(app).getOrCreate()


if __name__ == "__main__" and not {"-h", "--help"} & set(sys.argv):
    # spark-submit: the JVM builds the SparkContext (~3 s) while Python imports torch and checks
    # the job; main()'s session() then returns this one (getOrCreate holds a lock meanwhile)
    threading.Thread(target=session, daemon=True, name="dist-train-spark-start").start()

import numpy as np

from dist_train import checkpoint, cli, config, data, models, runtime, sharding, validate
from dist_train.engine import Result, WorkerData, fit
from dist_train.errors import ConfigError, DataError, UserError
from dist_train.outputs import prepare_out_dir, write_final

ROW = "__row"


class TrainingFailed(RuntimeError):
    """The barrier job failed (after every allowed attempt); the message names the rank."""


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
    dataset: data.Dataset | None = None


# ---------------------------------------------------------------- driver side


def preflight(spark, cfg) -> None:
    """Fail at once where Spark itself would wait ~10 minutes (barrier slot re-checks) or refuse."""
    conf = spark.sparkContext.getConf()
    if conf.get("spark.dynamicAllocation.enabled", "false").lower() == "true":
        raise UserError("Spark barrier mode cannot run with dynamic allocation: "
                        "set spark.dynamicAllocation.enabled=false")
    if cfg.data.sampling != "shard":
        raise ConfigError("data.sampling", "Spark tasks each read only their own partition: use shard")
    need = cfg.spark.workers
    task_cpus = int(conf.get("spark.task.cpus", "1"))
    slots = _task_slots(spark, task_cpus, need)
    if slots < need:
        raise UserError(f"spark.workers={need} needs {need} free task slots, the cluster has {slots} "
                        f"({slots * task_cpus} cores / spark.task.cpus={task_cpus}): lower spark.workers "
                        f"or add executors/cores (a barrier stage waits ~10 minutes before Spark gives up)")


def _task_slots(spark, task_cpus: int, need: int, wait_s: float = 10.0) -> int:
    """Task slots = cores / spark.task.cpus; on a cluster, give executors a moment to register."""
    sc = spark.sparkContext
    master = sc.master
    if master.startswith("local"):
        m = re.match(r"local\[(\d+|\*)", master)
        cores = (os.cpu_count() or 1) if not m or m.group(1) == "*" else int(m.group(1))
        return cores // task_cpus
    deadline = time.monotonic() + wait_s
    while True:
        slots = sc.defaultParallelism // task_cpus
        if slots >= need or time.monotonic() > deadline:
            return slots
        time.sleep(0.5)


def dataset_source(spark, cfg, ds: data.Dataset, outputs: int) -> Source:
    """A dataset the driver already holds (built-in or .npz): cut on the driver into the N
    shards, each shipped to its task by Spark. No DataFrame round trip: the rows are
    already here, and a DataFrame would only add a conversion and a shuffle (~6 s for
    60 MB here). For data larger than the driver's memory use Parquet, read on the executors."""
    if ds.y.ndim != 1:
        raise DataError(f"{ds.name}: the Spark launcher takes one label per row; targets of shape "
                        f"{list(ds.y.shape[1:])} per row need the local or MPI launcher")
    return Source(None, len(ds), "label", ["features"], ds.sample_shape, outputs, dataset=ds)


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


def dataframe_source(spark, cfg, df, name: str = "dataframe", files: list[Path] | None = None) -> Source:
    """Any DataFrame: its row order is partition by partition, row by row; a Parquet read
    is ordered file by file (path order), as the MPI and local launchers read it."""
    from pyspark.sql import functions as F

    label = cfg.data.label_column
    if label not in df.columns:
        raise DataError(f"{name}: no label column {label!r} (columns: {', '.join(df.columns)})")
    features = [c for c in df.columns if c != label and not c.startswith("__")]
    if not features:
        raise DataError(f"{name}: no feature columns besides {label!r}")
    if ROW not in df.columns:
        df = _with_row_index(df, files)
    stats = df.agg(F.count(F.lit(1)).alias("n"), F.min(label).alias("lo"), F.max(label).alias("hi"),
                   F.sum(F.when(F.col(label).isin(0, 1), 0).otherwise(1)).alias("nonbinary"),
                   F.sum(F.when(F.col(label) == F.floor(F.col(label)), 0).otherwise(1)).alias("fractional")).first()
    n = int(stats["n"])
    kinds = dict(df.dtypes)
    if len(features) == 1 and kinds[features[0]].startswith("array"):
        first = df.select(F.size(features[0]).alias("w")).first()
        width = int(first["w"]) if first else 0
    else:
        bad = [c for c in features if kinds[c] not in ("float", "double", "int", "bigint", "smallint", "tinyint")]
        if bad:
            raise DataError(f"{name}: feature column {bad[0]!r} is not numeric ({kinds[bad[0]]})")
        width = len(features)
    label_kind = "i" if kinds[label] in ("int", "bigint", "smallint", "tinyint") else "f"
    st = validate.DataStats(name, n, (width,), label_kind, float(stats["lo"] or 0), float(stats["hi"] or 0), 1,
                            not stats["nonbinary"])
    if label_kind == "f" and not stats["fractional"]:
        st.label_kind = "i"  # whole numbers stored as floats: class ids (as data.py reads files)
    outputs = validate.check_stats(cfg, st)
    return Source(df, n, label, features, (width,), outputs)


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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{cfg.data.path}: not a readable Parquet file ({first[:300]})") from None
    return dataframe_source(spark, cfg, df, name=str(cfg.data.path), files=files)


def train(spark, cfg, df=None, *, sets=(), out_dir=None, resume: bool = False, log=print) -> Result:
    """Train on Spark; returns rank 0's Result (`.model`, `.summary`). `cfg` is a config
    path or a loaded config; `df`, if given, is the data (label column `data.label_column`)."""
    if not isinstance(cfg, dict):
        cfg = config.load(cfg, list(sets))
    config.check_world(cfg, cfg.spark.workers)
    preflight(spark, cfg)
    out = Path(out_dir).resolve() if out_dir else None
    if out is not None:
        prepare_out_dir(out, resume)
    if df is not None:
        source = dataframe_source(spark, cfg, df)
    elif cfg.data.name == "parquet":
        source = parquet_source(spark, cfg)
    else:
        ds = data.load(cfg)
        source = dataset_source(spark, cfg, ds, validate.check(cfg, ds))
    return _run_attempts(spark, cfg, source, out, resume, log)


def _run_attempts(spark, cfg, source: Source, out: Path | None, resume: bool, log) -> Result:
    world = cfg.spark.workers
    shards = _shard(spark, source, world)
    for attempt in range(1, cfg.spark.max_attempts + 1):
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            checkpoint.atomic_write(out / ".attempt", str(attempt).encode())  # fences off older attempts
        task = _TrainTask(cfg, source.n, world, source.outputs, source.sample_shape, source.label_column,
                          source.feature_columns, str(out) if out else None, resume, attempt)
        follower = _Progress(out / "metrics.jsonl", log) if out is not None else None
        try:
            blobs = shards.barrier().mapPartitions(task).collect()
            break
        except Exception as e:  # noqa: BLE001 - Py4JJavaError and friends: find the rank's message
            cause = task_error(e)
            if attempt == cfg.spark.max_attempts:
                raise TrainingFailed(cause) from None
            print(f"[dist-train] spark: attempt {attempt} failed: {cause}; retrying from the newest checkpoint",
                  file=sys.stderr, flush=True)
            resume = True
        finally:
            if follower is not None:
                follower.stop()
    payload = checkpoint.load_bytes(blobs[0])
    model = models.build(cfg, source.sample_shape, source.outputs)
    model.load_state_dict(payload["model"]["state_dict"])
    result = Result(payload["model"]["state_dict"], payload["summary"], model)
    if out is not None:
        write_final(out, payload["model"], payload["summary"])
        (out / ".attempt").unlink(missing_ok=True)
    log(f"[dist-train] spark: done: {result.summary['steps']} steps on {world} workers, eval "
        f"{result.summary['eval']}" + (f", outputs in {out}" if out else ""))
    return result


class _Progress(threading.Thread):
    """Driver side: show the workers' progress by following rank 0's metrics.jsonl on the
    shared --out (Spark's own stage bar says only how many tasks are running)."""

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
            for line in f:
                if not line.endswith("\n"):
                    break  # being written; next time
                self.offset += len(line)
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("kind") == "step":
                    self.log(f"[dist-train] spark: step {rec['step']:>6}  epoch {rec['epoch']:>3}  "
                             f"loss {rec['loss']:.5f}  {rec.get('samples_per_sec', 0):,.0f} samples/s")
                elif rec.get("kind") == "epoch" and rec.get("loss") is not None:
                    self.log(f"[dist-train] spark: epoch {rec['epoch']} done, loss {rec['loss']:.5f}")

    def stop(self):
        self.halt.set()
        self.join(timeout=2)
        self.poll()


def task_error(e: BaseException) -> str:
    """The `[rank R] ...` line our task raised, out of Spark's long error text."""
    text = str(e)
    found = re.findall(r"(\[rank \d+\] [^\n]*)", text)
    if found:
        return found[0]
    for line in text.splitlines():
        if "Error" in line or "Exception" in line:
            return line.strip()[:500]
    return text.strip().splitlines()[0][:500] if text.strip() else type(e).__name__


def _shard(spark, source: Source, world: int):
    """An RDD of `world` partitions; partition r holds shard r as (r, Arrow IPC blob) pairs."""
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


# ---------------------------------------------------------------- executor side


class _TrainTask:
    """The barrier task: assemble this rank's shard, rendezvous, fit, return rank 0's model."""

    def __init__(self, cfg, n, world, outputs, sample_shape, label_column, feature_columns, out, resume, attempt):
        self.cfg, self.n, self.world, self.outputs = cfg, n, world, outputs
        self.sample_shape, self.label_column, self.feature_columns = sample_shape, label_column, feature_columns
        self.out, self.resume, self.attempt = out, resume, attempt

    def __call__(self, pieces):
        from pyspark import BarrierTaskContext

        ctx = BarrierTaskContext.get()
        rank = ctx.partitionId()
        try:
            rendezvous = _Rendezvous(ctx, rank, self.world, self.cfg)
            lo, x, y = self._assemble(rank, pieces)
            comm = rendezvous.finish()
            threads = runtime.set_threads(runtime.thread_budget(1, cores=ctx.cpus(), override=self.cfg.threads))
            result = fit(self.cfg, comm, WorkerData(x, y, self.n, self.outputs, offset=lo), out_dir=self.out,
                         resume=self.resume, launcher="spark", threads=threads, write_outputs=False,
                         fence=self._fence(), quiet=self.out is not None)  # the driver follows metrics.jsonl
        except BaseException as e:  # noqa: BLE001 - report which rank failed and why, in one line
            if _is_peer_loss(e):  # a consequence, not the cause: let the failing rank's report reach the driver first
                time.sleep(PEER_LOSS_GRACE_S)
            tb = "".join(traceback.format_exception(e))
            raise RuntimeError(f"[rank {rank}] {type(e).__name__}: {e}\n{tb}") from None
        finally:
            _leave_process_group()
        if rank == 0:
            yield checkpoint.to_bytes({"model": result.model_payload(self.cfg), "summary": result.summary})

    def _assemble(self, rank: int, pieces):
        import pyarrow as pa

        lo, hi = sharding.shard_range(self.n, self.world, rank)
        batches = [b for _, blob in pieces for b in pa.ipc.open_stream(pa.py_buffer(blob))]
        if batches:
            table = pa.Table.from_batches(batches)
            table = table.take(pa.array(np.argsort(table.column(ROW).to_numpy(), kind="stable")))
            rows = table.column(ROW).to_numpy()
            x, y = data.table_to_arrays(table.drop_columns([ROW]), self.label_column, f"partition {rank}")
        else:
            rows, x, y = np.zeros(0, np.int64), np.zeros((0, int(np.prod(self.sample_shape))), np.float32), \
                np.zeros(0, np.int64)
        if not np.array_equal(rows, np.arange(lo, hi)):
            raise DataError(f"partition {rank} holds rows that are not [{lo}, {hi}): is the DataFrame "
                            f"deterministic? (cache or checkpoint it first)")
        bad = data.find_nonfinite(x)
        if bad is not None:
            raise DataError(f"row {lo + bad} holds NaN or Inf")
        if y.dtype.kind in "iu" or (y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0)):
            y = y.astype(np.int64, copy=False)
        return lo, np.ascontiguousarray(x.reshape(len(x), *self.sample_shape)), y

    def _fence(self):
        if self.out is None:
            return None
        marker, attempt = Path(self.out) / ".attempt", str(self.attempt)
        return lambda: marker.exists() and marker.read_text().strip() == attempt


PEER_LOSS_GRACE_S = 3.0


def _is_peer_loss(e: BaseException) -> bool:
    text = str(e)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                   "exited while"))


class _Rendezvous:
    """Rank 0 opens a TCPStore on its executor's address; allGather shares the port and a
    job token; same-host workers then sum through shared memory (comm.shm).

    The allGather runs in a thread from the task's first moment: Spark answers a barrier
    call about a second after the last task arrives, and the task spends that second
    assembling its shard and importing what its first optimizer step would (`finish`)."""

    def __init__(self, ctx, rank: int, world: int, cfg):
        import uuid

        import torch.distributed as dist

        self.rank, self.world, self.cfg = rank, world, cfg
        self.hosts = [info.address.rsplit(":", 1)[0] for info in ctx.getTaskInfos()]
        self.timeout = timedelta(seconds=cfg.comm.timeout_s)
        self.store, self.gathered, self.error = None, None, None
        if rank == 0:  # listen only on the address Spark gave this task (TCPStore alone would listen on all)
            sock = socket.create_server((self.hosts[0], 0), backlog=max(128, world))
            self.store = dist.TCPStore(self.hosts[0], sock.getsockname()[1], world, is_master=True,
                                       timeout=self.timeout, wait_for_workers=False, master_listen_fd=sock.fileno())
            _STORE.append(sock)
        mine = f"{self.store.port} {uuid.uuid4().hex}" if self.store is not None else ""
        self.thread = threading.Thread(target=self._gather, args=(ctx, mine), daemon=True,
                                       name="dist-train-rendezvous")
        self.thread.start()

    def _gather(self, ctx, mine):
        try:
            self.gathered = ctx.allGather(mine)  # dist: rendezvous through Spark
        except BaseException as e:  # noqa: BLE001 - re-raised by finish() in the task's thread
            self.error = e

    def finish(self):
        import torch._dynamo  # noqa: F401 - torch.optim imports it at the first step (~1 s): do it while Spark answers
        import torch.distributed as dist

        from dist_train import shm
        from dist_train.comm import HostLocalComm, TorchDistComm

        self.thread.join()
        if self.error is not None:
            raise self.error
        port, token = self.gathered[0].split()
        store = self.store
        if store is None:
            store = dist.TCPStore(self.hosts[0], int(port), self.world, is_master=False, timeout=self.timeout)
        dist.init_process_group("gloo", store=store, rank=self.rank, world_size=self.world, timeout=self.timeout)
        _STORE.append(store)  # keep the store open while the group lives
        if self.cfg.comm.shm and shm.supported():
            return HostLocalComm(self.hosts, token, self.cfg.comm.timeout_s)
        return TorchDistComm()


_STORE: list = []


def _leave_process_group() -> None:
    """Python workers are reused by Spark: leave no process group behind for the next task."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _STORE.clear()


# ---------------------------------------------------------------- spark-submit entry


@cli.guarded
def main(argv: list[str] | None = None) -> int:
    args = cli.job_parser("launchers/spark.py").parse_args(argv)
    cfg = config.load(args.config, args.set)  # refuse bad input before the JVM's seconds of start-up
    out = cli.out_dir(args)
    spark = session()
    try:
        train(spark, cfg, out_dir=out, resume=args.resume, log=print)
    except TrainingFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    from launchers import spark as _module  # run through the importable module, so tasks pickle by reference

    sys.exit(_module.main())
