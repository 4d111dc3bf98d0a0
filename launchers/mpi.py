"""MPI launcher: N ranks under mpirun (dist_train.launchers.mpi).

    mpirun -n 2 --bind-to none python launchers/mpi.py conf/digits.yaml --out runs/digits-mpi
    dist-train mpi -n 2 conf/digits.yaml --out runs/digits-mpi     (adds the flags for you)

Success: rank 0 prints `[dist-train] done: ...` and mpirun exits 0; only rank 0 writes
runs/digits-mpi/. If any rank fails, stalls or leaves, every rank is stopped within
seconds, mpirun exits non-zero, and stderr names the rank and the cause.
"""

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a file: this checkout's dist_train, installed or not
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from dist_train.launchers.mpi import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
