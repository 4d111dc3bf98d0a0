"""A user's own training script, as it would run under torchrun (or srun, or mpirun):
where am I (comm.env.detect), my communicator (comm.connect), then fit.

    torchrun --nproc_per_node 2 tests/torchrun_script.py CONFIG OUT [KEY=VALUE...] [--plain]

--plain: fit alone, as the simplest script would (no failures.leaving, no close), and
rank 0 works on for two seconds after it while the others end.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_train import config, data, device, failures  # noqa: E402
from dist_train.comm import connect, env  # noqa: E402
from dist_train.train import fit, validate  # noqa: E402


def main(config_path: str, out: str, *sets: str) -> None:
    plain = "--plain" in sets
    cfg = config.load(config_path, [s for s in sets if s != "--plain"])
    where = env.detect()
    comm = connect(where, timeout_s=cfg.comm.timeout_s, shm=cfg.comm.shm)
    ds = data.load(cfg)
    threads = device.set_threads(device.thread_budget(where.local_size, override=cfg.threads))
    worker = data.WorkerData.whole(ds, validate.check(cfg, ds))
    if plain:
        fit(cfg, comm, worker, out_dir=out, launcher=where.kind, local_rank=where.local_rank, threads=threads)
        if where.rank == 0:
            time.sleep(2)  # rank 1 has ended meanwhile: past fit's last collective, no failure
        return
    with failures.leaving(comm):
        fit(cfg, comm, worker, out_dir=out, launcher=where.kind, local_rank=where.local_rank, threads=threads)


if __name__ == "__main__":
    main(*sys.argv[1:])
