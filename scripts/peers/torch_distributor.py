"""Peer for scripts/bench.py: pyspark's TorchDistributor running the DDP loop of
peers/ddp_train.py on 2 Spark tasks (local[2]), as a Spark user would.

    python scripts/peers/torch_distributor.py conf/bench_mlp.yaml --steps 100

Prints one JSON line: steady-state samples/s, the tasks' largest peak RSS and this process's wall time.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts" / "peers"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--steps", type=int, default=100)
    a = p.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{ROOT / 'scripts' / 'peers'}{os.pathsep}" + \
        os.environ.get("PYTHONPATH", "")
    from pyspark.ml.torch.distributor import TorchDistributor
    from pyspark.sql import SparkSession

    import ddp_train

    spark = SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false").getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    sps, rss = TorchDistributor(num_processes=2, local_mode=False, use_gpu=False).run(
        ddp_train.train, str(ROOT / a.config), a.steps)
    spark.stop()
    print(json.dumps({"steady_samples_per_sec": sps, "peak_rss_mb": rss,
                      "wall_seconds": time.perf_counter() - START}))


if __name__ == "__main__":
    main()
