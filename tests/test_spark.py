"""Spark launcher, really run: local[3] in this process, spark-submit, and a standalone
cluster started here. Same weights as MPI, uneven and empty partitions, fast failure
with the rank named, driver-side retry from a checkpoint, Parquet written by Spark."""

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from .helpers import BIN, ROOT, assert_same_weights, env, mpirun, ok

from dist_train import config, data  # noqa: E402
from dist_train.errors import ConfigError  # noqa: E402
from dist_train.launchers import spark as L  # noqa: E402
from dist_train.launchers.spark import feed  # noqa: E402

SMALL = ["train.epochs=2", "model.hidden=[32]", "train.log_every=0"]


@pytest.fixture(scope="module")
def spark():
    os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"  # executors import tests.faulty
    os.environ["PYSPARK_PYTHON"] = sys.executable
    from pyspark.sql import SparkSession

    s = (SparkSession.builder.master("local[3]").appName("dist-train-tests")
         .config("spark.ui.enabled", "false")
         .config("spark.sql.shuffle.partitions", "4").getOrCreate())
    s.sparkContext.setLogLevel("ERROR")
    yield s
    s.stop()


def test_spark_gives_the_same_weights_as_mpi(spark, tmp_path):
    L.train(spark, ROOT / "conf/digits.yaml", sets=[*SMALL, "spark.workers=2"], out_dir=tmp_path / "spark")
    ok(mpirun(2, "conf/digits.yaml", tmp_path / "mpi", *SMALL))
    assert_same_weights(tmp_path / "spark", tmp_path / "mpi")
    s = json.loads((tmp_path / "spark" / "summary.json").read_text())
    assert s["launcher"] == "spark" and s["world_size"] == 2
    assert {"model.pt", "summary.json", "metrics.jsonl", "checkpoints"} <= {p.name for p in (tmp_path / "spark").iterdir()}


def test_a_user_dataset_with_data_workers_trains_what_mpi_trains_and_objects_come_in_too(spark, tmp_path):
    """examples/byo.py's random crops, two data processes per task: each task makes the
    dataset itself (the module shipped to the executors) and reads only its rows."""
    sets = ["train.epochs=2", "threads=1", "train.log_every=0", "spark.workers=2"]
    L.train(spark, ROOT / "examples/byo.yaml", sets=sets, out_dir=tmp_path / "spark")
    ok(mpirun(2, "examples/byo.yaml", tmp_path / "mpi", *sets))
    assert_same_weights(tmp_path / "spark", tmp_path / "mpi")
    sys.path.insert(0, str(ROOT / "examples"))
    import byo

    result = L.train(spark, ROOT / "examples/byo.yaml", sets=sets, out_dir=tmp_path / "objects",
                     data=byo.CroppedDigits(pad=1), model=byo.small_cnn, loss=byo.smooth_cross_entropy)
    assert_same_weights(tmp_path / "objects", tmp_path / "mpi")
    assert result.summary["eval"]["top5"] > 0.5


def tiny_npz(tmp_path, rows):
    x = np.random.default_rng(4).standard_normal((rows, 5)).astype(np.float32)
    path = tmp_path / f"tiny{rows}.npz"
    np.savez(path, x=x, y=np.arange(rows) % 2)
    return path


@pytest.mark.parametrize("rows", [11, 2], ids=["uneven", "empty-partition"])
def test_uneven_and_empty_partitions_match_mpi(spark, tmp_path, rows):
    sets = ["data.name=npz", f"data.path={tiny_npz(tmp_path, rows)}", "data.eval_fraction=0", "train.batch_size=3",
            "train.epochs=3", "model.hidden=[4]", "train.optimizer=sgd", "train.lr=0.5", "spark.workers=3"]
    L.train(spark, ROOT / "conf/xor.yaml", sets=sets, out_dir=tmp_path / "spark")
    ok(mpirun(3, "conf/xor.yaml", tmp_path / "mpi", *sets))
    assert_same_weights(tmp_path / "spark", tmp_path / "mpi", atol=1e-6)


def shard_rows(spark, source, world, what="rows"):
    """Each partition of feed.shard's DataFrame, as its rows' indices (or its count of Arrow batches)."""
    import pyarrow as pa

    def rows(batches):
        from pyspark import TaskContext

        got = [b.column(feed.ROW).to_numpy() for b in feed._row_batches(batches)]
        value = len(got) if what == "batches" else np.concatenate(got).tolist() if got else []
        yield pa.record_batch({"part": pa.array([TaskContext.get().partitionId()], pa.int32()), "value": [json.dumps(value)]})

    parts = feed.shard(spark, source, world).mapInArrow(rows, "part int, value string").collect()
    assert sorted(p["part"] for p in parts) == list(range(world))
    return [json.loads(p["value"]) for p in sorted(parts, key=lambda p: p["part"])]


def test_partitions_hold_exactly_the_shards(spark):
    cfg = config.load(ROOT / "conf/digits.yaml", ["spark.workers=3"])
    ds = data.load(cfg)
    expected = [list(range(r * 1797 // 3, (r + 1) * 1797 // 3)) for r in range(3)]
    assert shard_rows(spark, feed.dataset_source(cfg, ds, 10), 3) == expected
    import pyarrow as pa

    df = spark.createDataFrame(pa.table({"features": list(ds.x.reshape(len(ds), -1)), "label": ds.y})).repartition(5)
    df = df.localCheckpoint()  # a deterministic row order to compare against
    got = shard_rows(spark, feed.dataframe_source(cfg, df), 3)
    assert [sorted(p) for p in got] == expected


def test_a_dataset_the_driver_holds_reaches_its_tasks_without_a_shuffle_where_it_can(spark):
    """A world of the session's parallelism (3 cores here: local data is sliced that many
    ways) scans its rows as a partition each (no Exchange: the session's first shuffle
    costs ~1 s of start-up); any other world takes the repartition, and still gets
    exactly its shards."""
    cfg = config.load(ROOT / "conf/digits.yaml", [])
    ds = data.load(cfg)

    def plan(world):
        return feed.shard(spark, feed.dataset_source(cfg, ds, 10), world)._jdf.queryExecution().executedPlan().toString()

    assert "Exchange" not in plan(3)
    assert "Exchange" in plan(2) and "Exchange" in plan(5)
    expected = [list(range(r * 1797 // 5, (r + 1) * 1797 // 5)) for r in range(5)]
    assert shard_rows(spark, feed.dataset_source(cfg, ds, 10), 5) == expected
    items = feed.shard(spark, feed.Source(None, 7, "label", [], (2,), 2, items=True), 4)
    assert "Exchange" not in items._jdf.queryExecution().executedPlan().toString()
    assert sorted(items.rdd.glom().map(len).collect()) == [1, 1, 1, 1]  # a row a task, nothing else


def test_a_built_in_dataset_is_made_by_each_task_and_checked_against_the_drivers(spark, monkeypatch):
    """No rows travel for built-in data (the tasks make it, as MPI ranks do: the same
    weights, test above); a task whose rows differ from the driver's stops the job, naming it."""
    cfg = config.load(ROOT / "conf/digits.yaml", ["spark.workers=2"])
    source = feed.builtin_source(cfg, data.load(cfg), 10)
    assert source.dataset is None and source.df is None and source.made
    assert "Exchange" not in feed.shard(spark, source, 2)._jdf.queryExecution().executedPlan().toString()
    real = feed.builtin_source
    monkeypatch.setattr(feed, "builtin_source", lambda *a: replace(real(*a), made="0" * 16))  # the driver's rows, other
    with pytest.raises(L.TrainingFailed, match=r"\[rank \d\] DataError: data error: digits: this executor makes other rows"):
        L.train(spark, ROOT / "conf/digits.yaml", sets=[*SMALL, "spark.workers=2"])


def test_the_partition_keys_computed_here_are_where_sparks_own_hash_puts_them(spark):
    """feed.spark_hash_int is Spark's hash(int) for ints of both signs, and each world's
    keys are the smallest that land in partitions 0..N-1 (what the shards' repartition uses)."""
    from pyspark.sql import functions as F

    values = list(range(-50, 200)) + [2**31 - 1, -2**31, 123456789]
    got = spark.createDataFrame([(v,) for v in values], "v int").select("v", F.hash("v").alias("h")).collect()
    assert {r["v"]: r["h"] for r in got} == {v: feed.spark_hash_int(v) for v in values}
    for world in (1, 2, 3, 5, 8, 13):
        keys = feed.partition_keys(world)
        rows = (spark.range(0, max(keys) + 1).select(F.col("id").cast("int").alias("k"))
                .select("k", F.pmod(F.hash("k"), F.lit(world)).alias("p")).groupBy("p").agg(F.min("k")).collect())
        assert sorted((r[0], r[1]) for r in rows) == list(enumerate(keys)), world


def test_a_failing_task_ends_the_job_fast_and_the_session_stays_usable(spark, tmp_path):
    beat = tmp_path / "beat"
    start = time.monotonic()
    with pytest.raises(L.TrainingFailed) as e:
        L.train(spark, ROOT / "conf/digits.yaml", out_dir=tmp_path / "fail", sets=[
            "train.epochs=50", "spark.workers=2", "model.target=tests.faulty:model",
            f"model.kwargs={{fail_rank: 1, fail_step: 4, heartbeat: '{beat}'}}"])
    assert time.monotonic() - start < 30
    assert str(e.value).startswith("[rank 1] RuntimeError: injected failure at step 4"), str(e.value)[:500]
    before = {p.name: p.read_text() for p in tmp_path.glob("beat.*")}
    time.sleep(2)
    assert {p.name: p.read_text() for p in tmp_path.glob("beat.*")} == before, "a worker is still training"
    assert not (tmp_path / "fail" / "model.pt").exists()
    result = L.train(spark, ROOT / "conf/xor.yaml", sets=["spark.workers=2", "train.epochs=300"])
    assert result.summary["eval"]["accuracy"] == 1.0


def test_a_stalled_task_is_named(spark, tmp_path):
    start = time.monotonic()
    with pytest.raises(L.TrainingFailed) as e:
        L.train(spark, ROOT / "conf/digits.yaml", sets=[
            "train.epochs=50", "spark.workers=2", "comm.timeout_s=4", "model.target=tests.faulty:model",
            "model.kwargs={fail_rank: 1, fail_step: 4, mode: sleep}"])
    assert time.monotonic() - start < 40
    assert "rank 1 did not arrive within 4 s (stalled)" in str(e.value), str(e.value)[:300]


def test_a_frozen_task_off_shared_memory_is_named_and_leaves_nothing(spark, tmp_path):
    """comm.shm false (gloo only) and rank 1 stopped with SIGSTOP: its watcher names it and
    ends it; the driver gets that line; no stopped process is left."""
    start = time.monotonic()
    with pytest.raises(L.TrainingFailed) as e:
        L.train(spark, ROOT / "conf/digits.yaml", sets=[
            "train.epochs=50", "spark.workers=2", "comm.timeout_s=4", "comm.shm=false",
            "model.target=tests.faulty:model", "model.kwargs={fail_rank: 1, fail_step: 4, mode: stop}"])
    assert time.monotonic() - start < 40
    assert "rank 1 stalled: no heartbeat for 4 s at step 4" in str(e.value), str(e.value)[:300]
    deadline = time.monotonic() + 15  # its watcher kills it once its own failure is on its way to the driver
    while (stopped := [p for p in subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True)
                       .stdout.splitlines() if p.startswith("T") and "pyspark" in p]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not stopped, stopped


def test_nan_on_one_task_stops_the_job_naming_step_and_rank(spark):
    with pytest.raises(L.TrainingFailed, match=r"non-finite loss at step 3 on rank\(s\) 1") as e:
        L.train(spark, ROOT / "conf/digits.yaml", sets=[
            "train.epochs=50", "spark.workers=2", "model.target=tests.faulty:model",
            "model.kwargs={fail_rank: 1, fail_step: 3, mode: nan}"])
    assert e.value.exit_code == 3  # as under local mode and MPI (failures.py)


def test_driver_retries_from_the_newest_checkpoint(spark, tmp_path, capsys):
    common = ["train.epochs=3", "spark.workers=2", "checkpoint.every_steps=5", "model.target=tests.faulty:model",
              "train.log_every=0"]
    L.train(spark, ROOT / "conf/digits.yaml", sets=[*common, "model.kwargs={fail_rank: 9}"],
            out_dir=tmp_path / "clean")
    marker = tmp_path / "failed-once"
    L.train(spark, ROOT / "conf/digits.yaml", out_dir=tmp_path / "retried", sets=[
        *common, "spark.max_attempts=2", f"model.kwargs={{fail_rank: 1, fail_step: 12, marker: '{marker}'}}"])
    assert marker.exists()
    err = capsys.readouterr().err
    assert "attempt 1 failed: [rank 1] RuntimeError: injected failure at step 12" in err
    assert_same_weights(tmp_path / "retried", tmp_path / "clean", atol=0, rtol=0)
    steps = [json.loads(x)["step"] for x in (tmp_path / "retried" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)


def test_parquet_written_by_spark_streams_several_arrow_batches(spark, tmp_path):
    from pyspark.sql import functions as F

    path = str(tmp_path / "pq")
    df = spark.range(0, 900, numPartitions=3).select(
        F.array(*[F.sin(F.col("id") * (k + 1)).cast("float") for k in range(6)]).alias("features"),
        (F.col("id") % 3).alias("label"))
    df.write.parquet(path)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "64")
    try:
        cfg = config.load(ROOT / "conf/xor.yaml", ["data.name=parquet", f"data.path={path}", "spark.workers=2",
                                                   "data.eval_fraction=0.1", "train.epochs=2"])
        source = feed.parquet_source(spark, cfg)
        batches_per_partition = shard_rows(spark, source, 2, what="batches")
        assert min(batches_per_partition) > 1, batches_per_partition
        sets = ["data.name=parquet", f"data.path={path}", "spark.workers=2", "data.eval_fraction=0.1",
                "train.epochs=2", "train.optimizer=sgd", "train.lr=0.1"]
        L.train(spark, ROOT / "conf/xor.yaml", sets=sets, out_dir=tmp_path / "spark")
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    ok(mpirun(2, "conf/xor.yaml", tmp_path / "mpi", *sets))
    assert_same_weights(tmp_path / "spark", tmp_path / "mpi", atol=1e-6)


def test_notebook_api_trains_on_a_dataframe(spark):
    from pyspark.sql import functions as F

    df = spark.range(0, 400, numPartitions=4).select(
        (F.col("id") % 2).cast("float").alias("a"), (F.floor(F.col("id") / 2) % 2).cast("float").alias("b"),
        ((F.col("id") % 2) != (F.floor(F.col("id") / 2) % 2)).cast("int").alias("label"))
    result = L.train(spark, ROOT / "conf/xor.yaml", df=df, sets=["spark.workers=2", "train.epochs=30",
                                                                 "train.batch_size=16", "data.eval_fraction=0.1"])
    import torch

    pred = result.model(torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])).argmax(1)
    assert pred.tolist() == [0, 1, 1, 0]
    assert result.summary["eval"]["accuracy"] == 1.0


def test_global_sampling_is_refused_under_spark(spark):
    with pytest.raises(ConfigError, match="data.sampling"):
        L.train(spark, ROOT / "conf/xor.yaml", sets=["data.sampling=global", "spark.workers=2"])


def spark_submit(*args, timeout=120):
    e = env()
    e["PYSPARK_PYTHON"] = sys.executable
    e["PYSPARK_DRIVER_PYTHON"] = sys.executable
    return subprocess.run([str(BIN / "spark-submit"), "--conf", "spark.ui.enabled=false", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT)


def test_too_few_slots_fail_at_once(tmp_path):
    start = time.monotonic()
    p = spark_submit("--master", "local[2]", ROOT / "launchers/spark.py", "conf/xor.yaml", "--out", tmp_path / "o",
                     "--set", "spark.workers=4")
    assert time.monotonic() - start < 30
    assert p.returncode == 2
    lines = [x for x in (p.stdout + p.stderr).splitlines() if x.startswith("error:")]  # spark-submit merges them
    assert len(lines) == 1 and "spark.workers=4 needs 4 free task slots, the cluster has 2" in lines[0]
    assert not (tmp_path / "o").exists()


def test_master_strings_give_their_task_slots_or_a_refusal():
    from dist_train.errors import UserError
    from dist_train.launchers.spark.driver import master_cores

    assert [master_cores(m, 8) for m in ("local", "local[3]", "local[*]", "local[4,2]", "local[*, 3]",
                                         "local-cluster[2,1,1024]", "local-cluster[3, 2, 512]")] == [1, 3, 8, 4, 8, 2, 6]
    assert [master_cores(m, 8) for m in ("spark://h:7077", "yarn", "k8s://https://h:6443")] == [None] * 3
    for bad in ("locall", "local[x]", "local-cluster[2]", "nowhere://h"):
        with pytest.raises(UserError, match="not a master this launcher can count task slots for"):
            master_cores(bad, 8)


@pytest.mark.parametrize("master", ["local", "local[1]"])
def test_a_master_with_too_few_slots_is_refused_at_once(master, tmp_path):
    """`--master local` (one core, no [N]) used to pass the check and leave Spark waiting ten minutes."""
    start = time.monotonic()
    p = spark_submit("--master", master, ROOT / "launchers/spark.py", "conf/xor.yaml", "--out", tmp_path / "o",
                     "--set", "spark.workers=2")
    assert time.monotonic() - start < 30
    lines = [x for x in (p.stdout + p.stderr).splitlines() if x.startswith("error:")]
    assert p.returncode == 2 and len(lines) == 1
    assert "spark.workers=2 needs 2 free task slots, the cluster has 1" in lines[0], lines


def test_a_failure_exits_with_the_same_code_as_under_the_other_launchers(tmp_path):
    """A non-finite loss stops training: exit 3 under spark-submit, as under local mode and mpirun."""
    p = spark_submit("--master", "local[2]", ROOT / "launchers/spark.py", "conf/digits.yaml", "--out", tmp_path / "o",
                     "--set", "spark.workers=2", "--set", "model.target=tests.faulty:model", "--set", "train.epochs=50",
                     "--set", "model.kwargs={fail_rank: 1, fail_step: 3, mode: nan}")
    lines = [x for x in (p.stdout + p.stderr).splitlines() if x.startswith("error:")]
    assert p.returncode == 3, (p.stdout + p.stderr)[-3000:]
    assert len(lines) == 1 and re.fullmatch(r"error: \[rank [01]\] TrainingError: non-finite loss at step 3 on "
                                            r"rank\(s\) 1 \(set train.skip_nonfinite: true to skip such steps\)",
                                            lines[0]), lines  # every task stops there: any may report it
    # the driver leaves stopping the context to the JVM's shutdown hook: nothing of the run is left
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert not left, left


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    """A Spark master and two 1-core workers on 127.0.0.1, from the pyspark installation."""
    tmp_path = tmp_path_factory.mktemp("standalone")
    e = env()
    e.update(PYSPARK_PYTHON=sys.executable, SPARK_LOG_DIR=str(tmp_path / "logs"), SPARK_WORKER_DIR=str(tmp_path / "w"))
    klass = str(BIN / "spark-class")
    procs = []

    def start(*args, log):
        f = open(tmp_path / log, "w")
        procs.append(subprocess.Popen([klass, *args], stdout=f, stderr=subprocess.STDOUT, env=e,
                                      start_new_session=True))
        return tmp_path / log

    master_log = start("org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", "0",
                       "--webui-port", "0", log="master.log")
    url = _wait_for(master_log, r"Starting Spark master at (spark://127\.0\.0\.1:\d+)")
    logs = [start("org.apache.spark.deploy.worker.Worker", url, "--cores", "1", "--memory", "1g", "--host",
                  "127.0.0.1", "--webui-port", "0", log=f"worker{i}.log") for i in range(2)]
    for log in logs:
        _wait_for(log, r"(Successfully registered with master)")
    yield url
    for p in procs:
        os.killpg(p.pid, 15)
    for p in procs:
        p.wait(timeout=30)


def _wait_for(log: Path, pattern: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text() if log.exists() else "")
        if m:
            return m.group(1)
        time.sleep(0.3)
    raise AssertionError(f"{log.name} never showed {pattern!r}:\n{log.read_text()[-2000:]}")


def test_standalone_cluster_through_spark_submit(standalone, tmp_path):
    p = spark_submit("--master", standalone, "--conf", "spark.executor.memory=1g", ROOT / "launchers/spark.py",
                     "conf/digits.yaml", "--out", tmp_path / "run", *[a for s in SMALL for a in ("--set", s)],
                     "--set", "spark.workers=2", timeout=180)
    assert p.returncode == 0, p.stderr[-4000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["launcher"] == "spark"
    ok(mpirun(2, "conf/digits.yaml", tmp_path / "mpi", *SMALL))
    assert_same_weights(tmp_path / "run", tmp_path / "mpi")


def test_an_executor_killed_mid_training_is_survived_by_a_retry(standalone, tmp_path):
    """kill -9 of one executor JVM (the Worker starts a new one); attempt 2 resumes from the checkpoint."""
    e = env()
    e.update(PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    out = tmp_path / "run"
    sets = ["model.hidden=[512, 512]", "train.epochs=40", "train.log_every=0", "checkpoint.every_steps=50",
            "spark.workers=2", "spark.max_attempts=2"]
    cmd = [str(BIN / "spark-submit"), "--master", standalone, "--conf", "spark.ui.enabled=false",
           str(ROOT / "launchers/spark.py"), "conf/digits.yaml", "--out", str(out)]
    cmd += [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=e, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not list((out / "checkpoints").glob("*.sha256")) and time.monotonic() < deadline:
        time.sleep(0.1)
    executors = subprocess.run(["pgrep", "-f", "CoarseGrainedExecutorBackend"], capture_output=True,
                               text=True).stdout.split()
    assert executors, "no executor to kill"
    os.kill(int(executors[0]), 9)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-4000:]
    assert "attempt 1 failed" in output
    s = json.loads((out / "summary.json").read_text())
    assert s["epochs"] == 40 and s["world_size"] == 2


def test_the_driver_shows_the_workers_progress(spark, tmp_path):
    lines = []
    L.train(spark, ROOT / "conf/digits.yaml", sets=["train.epochs=2", "model.hidden=[16]", "train.log_every=10",
                                                    "spark.workers=2"], out_dir=tmp_path / "o", log=lines.append)
    steps = [x for x in lines if x.startswith("[dist-train] spark: step")]
    assert steps and "loss" in steps[0] and "samples/s" in steps[0]
    assert any("epoch 1 done" in x for x in lines)


def test_without_out_the_driver_still_shows_the_progress_as_it_comes(spark):
    """No shared --out to follow: rank 0 sends its records to the driver over TCP."""
    lines = []
    L.train(spark, ROOT / "conf/digits.yaml", sets=["train.epochs=2", "model.hidden=[16]", "train.log_every=10",
                                                    "spark.workers=2"], log=lines.append)
    steps = [x for x in lines if x.startswith("[dist-train] spark: step")]
    assert [int(x.split()[3]) for x in steps] == list(range(10, 50, 10))  # 46 steps, logged every 10
    assert lines.index(steps[0]) > lines.index(next(x for x in lines if "starting 2 barrier tasks" in x))
    assert max(lines.index(x) for x in steps) < lines.index(next(x for x in lines if "spark: done" in x))
    assert any("epoch 1 done" in x for x in lines)


def test_the_model_reaches_the_driver_alike_through_the_shared_out_and_without_one(spark, tmp_path, monkeypatch):
    """With --out rank 0 writes model.pt and summary.json there itself and sends the summary
    alone (the driver reads the model back for the Result); without one the model travels
    through Spark to the driver."""
    from dist_train.launchers.spark import driver

    received, load_bytes = [], driver.load_bytes
    monkeypatch.setattr(driver, "load_bytes", lambda blob: received.append(len(blob)) or load_bytes(blob))
    sets = ["train.epochs=1", "model.hidden=[512]", "train.log_every=0", "spark.workers=2"]  # a 150 kB model
    written = L.train(spark, ROOT / "conf/digits.yaml", sets=sets, out_dir=tmp_path / "o", log=lambda line: None)
    assert received and max(received) < 20_000  # the summary
    received.clear()
    sent = L.train(spark, ROOT / "conf/digits.yaml", sets=sets, log=lambda line: None)
    assert max(received) > 100_000
    on_disk = torch.load(tmp_path / "o" / "model.pt", weights_only=True)["state_dict"]
    assert on_disk.keys() == written.state_dict.keys() == sent.state_dict.keys()
    for k in on_disk:
        assert torch.equal(on_disk[k], written.state_dict[k]) and torch.equal(on_disk[k], sent.state_dict[k])
        assert torch.equal(written.model.state_dict()[k], on_disk[k])
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["steps"] == written.summary["steps"]
    assert not (tmp_path / "o" / ".attempt").exists()


def test_a_driver_that_does_not_find_what_rank_0_wrote_says_out_must_be_shared(tmp_path):
    """Nothing there, or another run's files (its summary is not the one rank 0 sent)."""
    from dist_train.errors import UserError
    from dist_train.launchers.spark import driver, task
    from dist_train.train.checkpoint import to_bytes
    from dist_train.train.outputs import write_final

    sent = [{"chunk": task.WRITTEN_CHUNK, "payload": to_bytes({"steps": 7, "wall": 1.5})}]
    with pytest.raises(UserError, match="--out must be a path the driver and every executor share"):
        driver._written(tmp_path, sent)
    write_final(tmp_path, {"state_dict": {}}, {"steps": 7, "wall": 2.5})  # an earlier run's
    with pytest.raises(UserError, match="--out must be a path the driver and every executor share"):
        driver._written(tmp_path, sent)
    write_final(tmp_path, {"state_dict": {}}, {"steps": 7, "wall": 1.5})
    assert driver._written(tmp_path, sent)["summary"] == {"steps": 7, "wall": 1.5}


def test_under_a_local_master_the_tasks_meet_in_a_store_the_driver_opens(spark):
    """No allGather (Spark answers it up to a second late) where every task runs on the
    driver's host; elsewhere rank 0 opens the store and allGather shares its port (the
    standalone cluster's tests run that path)."""
    from datetime import timedelta

    import torch.distributed as dist

    from dist_train.launchers.spark import driver

    store, at = driver._driver_store(spark)
    assert at[0] == "127.0.0.1"
    joined = dist.TCPStore(at[0], at[1], 2, is_master=False, timeout=timedelta(seconds=10))  # as a task joins
    joined.set("rank 1", "here")
    assert store.get("rank 1") == b"here"

    class Classic:  # a classic session (a SparkContext) on another master
        def __init__(self, master):
            self.conf, self.sparkContext = {"spark.master": master}, object()

    assert driver._driver_store(Classic("spark://head:7077")) == (None, None)  # tasks on other hosts
    assert driver._driver_store(Classic("yarn")) == (None, None)
    store, at = driver._driver_store(Classic("local-cluster[2,1,1024]"))  # executors on the driver's host
    assert at[0] == "127.0.0.1" and store is not None
