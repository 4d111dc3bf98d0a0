"""For scripts/bench.py: a user's own script on dist-train's Python API, as the README
shows it, run under torchrun (the `torchrun-2` row: torch.distributed's store, the
same shared-memory exchange within the host).

    torchrun --nproc-per-node 2 scripts/peers/user_fit.py conf/bench_mlp.yaml OUT [KEY=VALUE...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import dist_train  # noqa: E402
from dist_train import config  # noqa: E402

if __name__ == "__main__":
    path, out, *sets = sys.argv[1:]
    dist_train.fit(config.load(path, sets), out_dir=out)
