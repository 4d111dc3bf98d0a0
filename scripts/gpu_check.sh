#!/usr/bin/env bash
# The GPU check (issue 18): one table, under 5 minutes on a single-GPU machine.
#   bash scripts/gpu_check.sh
# Uses the first Python that has torch with CUDA: $PYTHON, .venv/bin/python, python3.
# (scripts/setup.sh installs the CPU build of torch; on a GPU machine put the CUDA build in
# the venv first: .venv/bin/pip install --force-reinstall torch==2.13.0, PyPI's Linux wheel.)
set -euo pipefail
cd "$(dirname "$0")/.."
for py in ${PYTHON:-} .venv/bin/python python3; do
    if [ -x "$(command -v "$py" 2>/dev/null)" ] && "$py" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
        export PATH="$(dirname "$(command -v "$py")"):$PATH"  # its mpirun and spark-submit
        exec timeout 600 "$py" scripts/gpu_check.py "$@"
    fi
done
echo "error: no Python here has torch with a CUDA device (set PYTHON=..., or run scripts/gpu_check.py --cpu for the dry run)" >&2
exit 2
