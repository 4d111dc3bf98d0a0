"""The core imports neither mpi4py nor pyspark (STYLE.md 3)."""

import subprocess
import sys


def test_import_dist_train_pulls_in_no_engine():
    code = ("import sys, dist_train, dist_train.train, dist_train.cli, dist_train.comm, dist_train.comm.shm, "
            "dist_train.comm.watchdog, dist_train.comm.torchdist, dist_train.launchers.local, dist_train.use; "
            "print(sorted(m for m in ('mpi4py', 'pyspark') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
