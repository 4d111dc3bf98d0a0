"""Local mode: one process, a world of one.

    python launchers/local.py conf/digits.yaml --out runs/digits
    dist-train local conf/digits.yaml --out runs/digits --set train.lr=0.05

Success: the last line reads `[dist-train] done: ... eval accuracy 0.97...`, and
runs/digits/ holds model.pt, summary.json, metrics.jsonl and checkpoints/.
"""

from __future__ import annotations

import sys

from .. import device, failures
from ..comm import LocalComm
from ..train import fit
from ..train.clock import job_start
from .args import job_parser
from .common import prepare


def main(argv: list[str] | None = None) -> int:
    """0 on success; a failure exits (SystemExit) with the failure table's code."""
    return failures.run(lambda: _train(argv), rank=lambda: 0, world=lambda: 1, abort=lambda code: None)


def _train(argv) -> None:
    args = job_parser("launchers/local.py").parse_args(argv)
    job = prepare(args, world_size=1).on_device()
    try:
        threads = device.set_threads(device.thread_budget(local_workers=1, override=job.cfg.threads,
                                                          data_workers=job.data_workers))
        fit(job.cfg, LocalComm(), job.worker_data(), out_dir=job.out, resume=job.resume, launcher="local",
            device=job.device, threads=threads, job_started=job_start())
    finally:
        job.lock.release()


if __name__ == "__main__":
    sys.exit(main())
