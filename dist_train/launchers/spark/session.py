"""The SparkSession the launcher runs in (light: imports pyspark only, so spark-submit's
entry can start the JVM before torch is imported)."""

import os
import sys


def session(app: str = "dist-train", master: str | None = None):
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # local executors run this environment's Python
    builder = SparkSession.builder.appName(app)
    if master is not None and not SparkConf().contains("spark.master"):
        builder = builder.master(master)
    given = SparkConf()
    if not given.contains("spark.log.level"):  # Spark's INFO lines (~100 a run) unless the user asks for them
        builder = builder.config("spark.log.level", "WARN")
    if not given.contains("spark.ui.showConsoleProgress"):  # its stage bar garbles the driver's progress lines
        builder = builder.config("spark.ui.showConsoleProgress", "false")
    return builder.getOrCreate()
