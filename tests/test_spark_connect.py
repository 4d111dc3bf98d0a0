"""Spark Connect, really run: a local Connect server started here
(`SparkSession.builder.remote("local[3]")`), which has no SparkContext and no RDDs. The
notebook `train`, and a Pipeline's fit and transform, run over it as over a classic
session, and give the weights mpirun gives on the same rows."""

import os
import sys

import numpy as np
import pytest

from .helpers import ROOT, assert_same_weights, mpirun, ok
from .test_spark_ml import SETS, fit_digits_pipeline


@pytest.fixture(scope="module")
def connect():
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    from pyspark.sql import SparkSession

    s = SparkSession.builder.remote("local[3]").appName("dist-train-connect-tests").getOrCreate()
    assert type(s).__module__.startswith("pyspark.sql.connect")
    yield s
    s.stop()


def test_train_over_connect_gives_the_weights_of_mpirun(connect, tmp_path):
    from dist_train.spark import train

    sets = ["train.epochs=2", "model.hidden=[32]", "train.log_every=0", "spark.workers=2"]
    train(connect, ROOT / "conf/digits.yaml", sets=sets, out_dir=tmp_path / "connect")
    ok(mpirun(2, "conf/digits.yaml", tmp_path / "mpi", *sets))
    assert_same_weights(tmp_path / "connect", tmp_path / "mpi")


def test_a_pipeline_fits_transforms_saves_and_loads_over_connect(connect, tmp_path):
    from pyspark.ml import PipelineModel

    model, test_df, train_file = fit_digits_pipeline(connect, tmp_path, tmp_path / "connect")
    got = model.transform(test_df).select("label", "prediction").collect()
    assert len(got) == 297 and np.mean([r["label"] == r["prediction"] for r in got]) >= 0.95
    model.write().save(str(tmp_path / "saved"))
    again = PipelineModel.load(str(tmp_path / "saved")).transform(test_df).select("prediction").collect()
    assert [r["prediction"] for r in again] == [r["prediction"] for r in got]
    ok(mpirun(2, "conf/digits.yaml", tmp_path / "mpi", "data.name=parquet", f"data.path={train_file}", *SETS))
    assert_same_weights(tmp_path / "connect", tmp_path / "mpi")
