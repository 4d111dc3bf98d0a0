"""The SparkSession the launcher runs in (light: imports pyspark only, so spark-submit's
entry can start the JVM before torch is imported)."""

import os
import sys


def session(app: str = "dist-train"):
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # local executors run this environment's Python
    return SparkSession.builder.appName(app).getOrCreate()
