"""A user's own training script, as it would run under torchrun (or srun, or mpirun):
where am I (comm.env.detect), my communicator (comm.connect), then fit.

    torchrun --nproc_per_node 2 tests/torchrun_script.py CONFIG OUT [KEY=VALUE...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_train import config, data, device, failures  # noqa: E402
from dist_train.comm import connect, env  # noqa: E402
from dist_train.train import fit, validate  # noqa: E402


def main(config_path: str, out: str, *sets: str) -> None:
    cfg = config.load(config_path, list(sets))
    where = env.detect()
    comm = connect(where, timeout_s=cfg.comm.timeout_s, shm=cfg.comm.shm)
    ds = data.load(cfg)
    threads = device.set_threads(device.thread_budget(where.local_size, override=cfg.threads))
    with failures.leaving(comm):
        fit(cfg, comm, data.WorkerData.whole(ds, validate.check(cfg, ds)), out_dir=out, launcher=where.kind,
            local_rank=where.local_rank, threads=threads)


if __name__ == "__main__":
    main(*sys.argv[1:])
