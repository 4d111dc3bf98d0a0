"""Spark ML's shape, really run on local[3]: a Pipeline of VectorAssembler and
DistTrainEstimator learns the digits, transforms on the executors, saves and loads, and
trains the weights mpirun trains on the same rows; a bad DataFrame is refused on the
driver, before any barrier task, with one line."""

import os
import subprocess
import sys

import numpy as np
import pytest

from .helpers import ROOT, assert_same_weights, mpirun, ok

from dist_train import data  # noqa: E402
from dist_train.errors import DataError, UserError  # noqa: E402

PIXELS = [f"p{i}" for i in range(64)]
SETS = ["train.log_every=0", "checkpoint.keep=1"]


@pytest.fixture(scope="module")
def spark():
    os.environ["PYSPARK_PYTHON"] = sys.executable
    from pyspark.sql import SparkSession

    s = (SparkSession.builder.master("local[3]").appName("dist-train-ml-tests")
         .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
         .config("spark.sql.shuffle.partitions", "4")
         .config("spark.executorEnv.MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this
         .getOrCreate())
    s.sparkContext.setLogLevel("ERROR")
    yield s
    s.stop()


def digits_parquet(path, rows):
    """The digits as 64 pixel columns and a label, rows `rows` in that order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ds = data.digits()
    flat = ds.x.reshape(len(ds), -1)[rows]
    pq.write_table(pa.table({**{p: flat[:, i].astype(np.float64) for i, p in enumerate(PIXELS)},
                             "label": ds.y[rows]}), path)
    return path


def fit_digits_pipeline(spark, tmp_path, out):
    """VectorAssembler over the 64 pixel columns, then DistTrainEstimator, fit on 1,500 rows
    of a Parquet file; returns (PipelineModel, the 297 held-out rows, the training file)."""
    from pyspark.ml import Pipeline
    from pyspark.ml.feature import VectorAssembler

    from dist_train.spark import DistTrainEstimator

    order = np.random.default_rng(0).permutation(1797)
    train_file = digits_parquet(tmp_path / "train.parquet", order[:1500])
    test_df = spark.read.parquet(str(digits_parquet(tmp_path / "test.parquet", order[1500:])))
    estimator = DistTrainEstimator(config=str(ROOT / "conf/digits.yaml"), sets=SETS, workers=2, outDir=str(out))
    pipeline = Pipeline(stages=[VectorAssembler(inputCols=PIXELS, outputCol="features"), estimator])
    return pipeline.fit(spark.read.parquet(str(train_file))), test_df, train_file


def test_a_pipeline_learns_the_digits_saves_loads_and_matches_mpirun(spark, tmp_path):
    from pyspark.ml import PipelineModel

    from dist_train.spark import DistTrainModel

    model, test_df, train_file = fit_digits_pipeline(spark, tmp_path, tmp_path / "spark")
    assert isinstance(model.stages[1], DistTrainModel)

    got = model.transform(test_df).select("label", "prediction", "probability").collect()
    assert len(got) == 297
    accuracy = np.mean([r["label"] == r["prediction"] for r in got])
    assert accuracy >= 0.95, accuracy
    probs = np.array([r["probability"].toArray() for r in got])
    assert probs.shape == (297, 10) and np.allclose(probs.sum(1), 1, atol=1e-6)
    assert (probs.argmax(1) == [r["prediction"] for r in got]).all()

    model.write().save(str(tmp_path / "saved"))
    again = PipelineModel.load(str(tmp_path / "saved")).transform(test_df).select("prediction", "probability").collect()
    assert [r["prediction"] for r in again] == [r["prediction"] for r in got]
    assert np.array_equal(np.array([r["probability"].toArray() for r in again]), probs)

    import torch

    module = model.stages[1].torch_model()
    x = torch.from_numpy(np.array([[r[p] for p in PIXELS] for r in test_df.collect()], np.float32))
    assert module(x).argmax(1).tolist() == [int(r["prediction"]) for r in got]

    ok(mpirun(2, "conf/digits.yaml", tmp_path / "mpi", "data.name=parquet", f"data.path={train_file}", *SETS))
    assert_same_weights(tmp_path / "spark", tmp_path / "mpi")


def test_features_as_columns_an_array_or_a_vector_are_the_same_rows(spark):
    from pyspark.ml.feature import VectorAssembler
    from pyspark.sql import functions as F

    from dist_train.spark import DistTrainEstimator

    df = spark.range(5).select(*[(F.col("id") * (k + 1)).cast("double").alias(f"c{k}") for k in range(3)],
                               (F.col("id") % 2).alias("label"))
    df = VectorAssembler(inputCols=["c0", "c1", "c2"], outputCol="vec").transform(df)
    df = df.withColumn("arr", F.array("c0", "c1", "c2"))
    forms = [DistTrainEstimator(featuresCol=c)._features(df) for c in (["c0", "c1", "c2"], "vec", "arr")]
    rows = [[list(r[0]) for r in df.select(f).collect()] for f in forms]
    assert rows[0] == rows[1] == rows[2] == [[i * 1.0, i * 2.0, i * 3.0] for i in range(5)]


def test_an_estimator_persists_its_params(spark, tmp_path):
    from dist_train.spark import DistTrainEstimator

    e = DistTrainEstimator(config={"train": {"epochs": 3}}, sets=["train.lr=0.05"], featuresCol=["a", "b"],
                           labelCol="y", workers=3)
    e.write().save(str(tmp_path / "est"))
    back = DistTrainEstimator.load(str(tmp_path / "est"))
    assert back.uid == e.uid
    for name in ("config", "sets", "featuresCol", "labelCol", "workers"):
        assert back.getOrDefault(name) == e.getOrDefault(name)
    cfg = back.load_config()
    assert (cfg.train.epochs, cfg.train.lr, cfg.data.label_column, cfg.spark.workers) == (3, 0.05, "y", 3)


def bad_frames(spark):
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, DoubleType, LongType, StringType, StructField, StructType

    def frame(rows, label_type, feature_type):
        schema = StructType([StructField("features", feature_type), StructField("label", label_type)])
        return spark.createDataFrame(rows, schema)

    arr = ArrayType(DoubleType())
    return {
        "holds strings": frame([([1.0, 2.0], "cat"), ([0.0, 1.0], "dog")], StringType(), arr),
        "null rows": frame([([1.0, 2.0], 1), ([0.0, 1.0], None)], LongType(), arr),
        "different lengths": frame([([1.0, 2.0], 1), ([0.0], 0)], LongType(), arr),
        "hold nulls": frame([([1.0, None], 1), ([0.0, 1.0], 0)], LongType(), arr),
        "array<array<double>>": frame([([[1.0]], 1), ([[0.0]], 0)], LongType(), ArrayType(arr)),
        "not numeric": spark.range(2).select(F.lit("x").alias("name"), F.col("id").alias("label")),
    }


@pytest.mark.parametrize("problem", ["holds strings", "null rows", "different lengths", "hold nulls",
                                     "array<array<double>>", "not numeric"])
def test_a_bad_dataframe_is_refused_on_the_driver_in_one_line(spark, problem):
    from dist_train.spark import train

    jobs = spark.sparkContext.statusTracker().getJobIdsForGroup()
    with pytest.raises(DataError) as e:
        train(spark, ROOT / "conf/xor.yaml", df=bad_frames(spark)[problem], sets=["spark.workers=2"])
    assert problem in str(e.value) and "\n" not in str(e.value)
    assert "label" in str(e.value) or "feature" in str(e.value)
    assert len(spark.sparkContext.statusTracker().getJobIdsForGroup()) - len(jobs) <= 6  # no barrier stage ran


def test_parquet_files_with_different_schemas_are_refused_naming_the_file_and_column(spark, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dist_train.spark import train

    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"a": [1.0, 2.0], "label": [0, 1]}), tmp_path / "pq" / "part-0.parquet")
    pq.write_table(pa.table({"a": ["x", "y"], "label": [0, 1]}), tmp_path / "pq" / "part-1.parquet")
    sets = ["data.name=parquet", f"data.path={tmp_path / 'pq'}", "spark.workers=2"]
    with pytest.raises(DataError, match=r"part-1.parquet: column 'a' is string, in part-0.parquet it is double"):
        train(spark, ROOT / "conf/xor.yaml", sets=sets)
    with pytest.raises(DataError, match=r"part-1.parquet: column 'a' is string"):
        data.load_parquet(tmp_path / "pq", "label")


def test_an_executor_python_without_torch_is_one_line(spark, tmp_path):
    from dist_train.launchers.spark import driver

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    sc = spark.sparkContext
    kept = sc.pythonExec
    sc.pythonExec = str(tmp_path / "bare" / "bin" / "python")
    try:
        with pytest.raises(UserError, match=r"the executors' Python \(.*bare/bin/python\) cannot import torch "
                                            r"\(ModuleNotFoundError"):
            driver.check_executors(spark)
    finally:
        sc.pythonExec = kept
    driver.check_executors(spark)  # this environment's Python has both


def test_a_spark_job_makes_one_mlflow_run(spark, tmp_path, monkeypatch):
    from dist_train.spark import train

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # here; the executors have it from spark.executorEnv
    from .test_mlflow import check_one_run

    uri = f"file:{tmp_path / 'mlruns'}"
    train(spark, ROOT / "conf/digits.yaml", out_dir=tmp_path / "out", sets=[
        "train.epochs=2", "model.hidden=[16]", "train.log_every=5", "spark.workers=2", "log.mlflow=true",
        f"log.mlflow_uri={uri}"])
    client, run = check_one_run(uri, tmp_path / "out")
    assert run.data.tags["dist_train.launcher"] == "spark"
    assert len(client.get_metric_history(run.info.run_id, "loss")) >= 4


def test_predict_with_spark_matches_predict_on_one_machine(tmp_path):
    """`dist-train predict RUN INPUT --spark`: a directory of Parquet files predicted on the
    executors, written by them; the same rows and predictions as the local predict."""
    import pyarrow.parquet as pq

    from .helpers import BIN, local, run

    (tmp_path / "in").mkdir()
    digits_parquet(tmp_path / "in" / "part-0.parquet", np.arange(0, 900))
    digits_parquet(tmp_path / "in" / "part-1.parquet", np.arange(900, 1797))
    ok(local("conf/digits.yaml", tmp_path / "run", "data.name=parquet", f"data.path={tmp_path / 'in'}",
             "train.epochs=3", "train.log_every=0"))
    ok(run([BIN / "dist-train", "predict", tmp_path / "run", tmp_path / "in", "--out", tmp_path / "one.parquet"]))
    p = run([BIN / "dist-train", "predict", tmp_path / "run", tmp_path / "in", "--spark", "--master", "local[2]",
             "--out", tmp_path / "many"], timeout=240)
    ok(p)
    assert "wrote 1797 predictions" in p.stderr
    one = pq.read_table(tmp_path / "one.parquet").to_pandas()
    many = pq.read_table(tmp_path / "many").to_pandas().sort_values("row").reset_index(drop=True)
    assert list(many["row"]) == list(one["row"]) == list(range(1797))
    assert np.array_equal(many["prediction"].to_numpy(), one["prediction"].to_numpy().astype(np.float64))
    assert np.allclose(np.stack(many["probability"]).sum(1), 1) and "p0" not in many.columns
    assert list(many["label"]) == list(data.digits().y)  # the columns that are not features come along
    again = run([BIN / "dist-train", "predict", tmp_path / "run", tmp_path / "in", "--spark", "--out",
                 tmp_path / "many"], timeout=240)
    assert again.returncode == 2 and "exists" in again.stderr.strip().splitlines()[-1]
