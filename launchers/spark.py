"""Spark launcher: one barrier stage of `spark.workers` tasks (dist_train.launchers.spark).

    spark-submit --master 'local[2]' launchers/spark.py conf/digits.yaml --out /shared/runs/digits
    dist-train spark conf/digits.yaml --out /shared/runs/digits --master spark://host:7077

Success: the driver prints `[dist-train] spark: done ...` and exits 0; --out (a path the
driver and every executor share) holds model.pt, summary.json, metrics.jsonl and
checkpoints/. If a task fails, the job ends within seconds and the driver prints
`error: [rank R] <cause>`, with the same exit code as under the other launchers.
"""

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":  # spark-submit: this checkout's dist_train, installed or not
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    runpy.run_module("dist_train.launchers.spark.submit", run_name="__main__")
else:  # `from launchers.spark import train` in a notebook started in a checkout
    from dist_train.launchers.spark import TrainingFailed, train  # noqa: F401
