"""Local mode: one process, a world of one (dist_train.launchers.local).

    python launchers/local.py conf/digits.yaml --out runs/digits
    dist-train local conf/digits.yaml --out runs/digits --set train.lr=0.05

Success: the last line reads `[dist-train] done: ... eval accuracy 0.97...`, and
runs/digits/ holds model.pt, summary.json, metrics.jsonl and checkpoints/.
"""

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a file: this checkout's dist_train, installed or not
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from dist_train.launchers.local import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
