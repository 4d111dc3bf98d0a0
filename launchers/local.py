"""Local mode: one process, a world of one.

    python launchers/local.py conf/digits.yaml --out runs/digits
    dist-train local conf/digits.yaml --out runs/digits --set train.lr=0.05

Success: the last line reads `[dist-train] done: ... eval accuracy 0.97...`, and
runs/digits/ holds model.pt, summary.json, metrics.jsonl and checkpoints/.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dist_train import cli, runtime
from dist_train.comm import LocalComm
from dist_train.engine import WorkerData, fit


@cli.guarded
def main(argv: list[str] | None = None) -> int:
    args = cli.job_parser("launchers/local.py").parse_args(argv)
    job = cli.prepare(args, world_size=1)
    threads = runtime.set_threads(runtime.thread_budget(local_workers=1, override=job.cfg.threads))
    fit(job.cfg, LocalComm(), WorkerData.whole(job.dataset, job.outputs), out_dir=job.out,
        resume=job.resume, launcher="local", threads=threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
