"""Command line: the `dist-train` console script.

    dist-train local CONFIG [--out DIR] [--set KEY=VALUE]... [--resume]
    dist-train mpi -n N CONFIG [...]          (runs mpirun with the flags people forget)
    dist-train spark CONFIG [...]             (runs spark-submit)
    dist-train config                          (prints the config reference)
    dist-train eval RUN_DIR [--data FILE] | predict RUN_DIR INPUT --out P.parquet | export | info
    dist-train plot RUN_DIR [RUN_DIR...] --out runs.png

Bad input prints one line and exits with code 2, never a traceback. `mpi` and `spark`
run mpirun / spark-submit in a session of their own and stay with it: a signal to
dist-train while the job trains asks it to checkpoint and stop (preempt.py); before
that, or a second one, reaches it as SIGTERM (so Open MPI and Spark clean up after
themselves), and dist-train returns only once it is gone.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from . import config, failures, preempt, usercode
from .errors import UserError
from .files import ATTEMPT_ENV, ATTEMPT_NAME, claim_attempt
from .jobenv import PROGRESS_ENV, STARTED_ENV
from .launchers.args import _Parser, add_job_args, default_out, find_executable, job_argv

# torch (~1 s to import) only where a command needs it: `dist-train spark` starts the JVM without it

KILL_AFTER_S = 15.0  # after forwarding a signal, what is still running then is killed
STOP_GRACE_S = 60.0  # after asking a training job to checkpoint and stop, how long it may take


EXAMPLES = """examples:
  dist-train local conf/digits.yaml --out runs/d --set train.lr=0.05 --set model.hidden=[256,128]
  dist-train local conf/digits.yaml --out runs/d --set train.epochs=60 --resume
  dist-train mpi -n 4 conf/digits.yaml --out runs/d-mpi --max-restarts 2
  dist-train spark conf/digits.yaml --master 'local[2]' --out runs/d-spark
  dist-train config conf/digits.yaml --set train.lr=1e-3
  dist-train predict runs/d inputs.npz --out preds.csv --probabilities
  dist-train plot runs/d runs/d-mpi --out runs.png
(--set repeats: one KEY=VALUE each; `dist-train config` lists every key)"""


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dist-train", description="Exact, hang-free data-parallel training for PyTorch.",
                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_job_args(sub.add_parser("local", help="train in this process"))
    mpi = add_job_args(sub.add_parser("mpi", help="train with mpirun -n N"))
    mpi.add_argument("-n", "--np", type=int, required=True, dest="n", help="number of ranks")
    mpi.add_argument("--mpirun-arg", action="append", default=[], help="extra argument for mpirun (repeatable)")
    mpi.add_argument("--max-restarts", type=int, metavar="N",
                     help="after a failure, start again from the newest checkpoint up to N times "
                          "(default: the config's mpi.max_restarts, 0)")
    spark = add_job_args(sub.add_parser("spark", help="train as a Spark barrier job (spark-submit)"))
    spark.add_argument("--master", help="Spark master URL (default: spark-submit's)")
    spark.add_argument("--spark-arg", action="append", default=[], help="extra argument for spark-submit")
    cf = sub.add_parser("config", help="print the config reference, or CONFIG merged with --set and validated",
                        epilog="examples:\n  dist-train config\n  dist-train config conf/digits.yaml --set "
                               "train.lr=0.05 --set model.hidden=[256,128]",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    cf.add_argument("config", nargs="?", help="YAML config file (without: the reference of every key)")
    cf.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (repeatable: --set a=1 --set b=2)")
    ev = sub.add_parser("eval", help="loss and accuracy of a run's model (its held-out rows, or --data)")
    ev.add_argument("run_dir")
    ev.add_argument("--data", help=".npz or Parquet to evaluate on instead (every row)")
    pr = sub.add_parser("predict", help="predictions of a run's model for an .npz or Parquet input")
    pr.add_argument("run_dir")
    pr.add_argument("input")
    pr.add_argument("--out", required=True, help="a .parquet or .csv file to write (with --spark: a Parquet "
                    "directory)")
    pr.add_argument("--probabilities", action="store_true", help="add each class's probability (p_CLASS columns)")
    pr.add_argument("--spark", action="store_true", help="predict on Spark executors, for a Parquet input too large "
                    "for one machine")
    pr.add_argument("--master", help="with --spark: the Spark master (default local[*])")
    ex = sub.add_parser("export", help="write a run's model as ONNX or TorchScript")
    ex.add_argument("run_dir")
    ex.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    ex.add_argument("--out", help="file to write (default RUN_DIR/model.onnx or model.ts.pt)")
    for p in (ev, pr, ex):
        p.add_argument("--trust-code", action="store_true",
                       help="import the user code the run's config names (model.target, data.target, train.loss...)")
    sub.add_parser("info", help="versions, threads, MPI, Spark, Java and devices (for a bug report)")
    pl = sub.add_parser("plot", help="PNG of loss/accuracy curves of runs, overlaid, and where step time went")
    pl.add_argument("runs", nargs="+")
    pl.add_argument("--out", default="runs.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.command in ("local", "mpi", "spark") and args.resume and not args.out:
            raise UserError("--resume needs --out DIR: the run directory to continue")
        return COMMANDS[args.command](args)
    except UserError as e:
        failures.say(f"error: {e}")
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def _local(args) -> int:
    from .launchers import local

    return local.main(job_argv(args))


def _mpi(args) -> int:
    from . import device
    from .launchers import mpi
    from .launchers.common import prepare
    from .train import checkpoint

    if args.n < 1:
        raise UserError(f"-n must be at least 1, got {args.n}")
    if args.max_restarts is not None and args.max_restarts < 0:
        raise UserError(f"--max-restarts must be 0 or more, got {args.max_restarts}")
    args.out = args.out or default_out(args.config)
    job = prepare(args, args.n, lock="check")  # refuse bad input, or an --out in use, before any rank starts
    here = _ranks_here(args.mpirun_arg, os.environ)
    if here:
        device.preflight(job.cfg, args.n)  # e.g. cuda:0 for 2 ranks: one line here, not MPI_ABORT on each rank
    env = dict(os.environ)
    env.setdefault(PROGRESS_ENV, "bar" if sys.stdout.isatty() else "lines")
    env.setdefault(STARTED_ENV, repr(time.time()))  # the metrics' wall clock counts mpirun's start-up too
    relay = None if here else _usr1  # ranks elsewhere may not see the stop file
    # one host: the ranks' MPI traffic through shared memory only, no TCP port of theirs open to the network
    local_only = ["--mca", "btl", "self,sm"] if here and not any("btl" in a for a in args.mpirun_arg) \
        and (mpi.open_mpi_major() or 0) >= 5 else []
    restarts = job.cfg.mpi.max_restarts if args.max_restarts is None else args.max_restarts
    for attempt in range(1, restarts + 2):
        if restarts:
            env[ATTEMPT_ENV] = str(attempt)
            claim_attempt(args.out, attempt)  # an older attempt's rank 0 can no longer write there
        cmd = mpi.command(args.n, mpi.program(job_argv(args)), local_only + args.mpirun_arg, env=env)
        failures.say("+ " + " ".join(cmd))
        code, signalled = supervise(cmd, env, whole_group=False, out=Path(args.out), relay=relay)
        if code in FINAL_CODES or signalled or attempt > restarts:
            break
        args.resume = bool(checkpoint.listing(Path(args.out) / "checkpoints"))
        start = "the newest checkpoint" if args.resume else "the start (no checkpoint yet: checkpoint.every_steps)"
        failures.say(f"[dist-train] mpi: attempt {attempt} failed (exit {code}); restarting from {start}, "
                     f"attempt {attempt + 1} of {restarts + 1}")
    if restarts:
        (Path(args.out) / ATTEMPT_NAME).unlink(missing_ok=True)
    return code


# exits a restart would only repeat: success, bad input, training stopped on purpose, a stop asked by a signal
FINAL_CODES = {0, failures.BAD_INPUT.exit_code, failures.STOPPED.exit_code,
               *(128 + s for s in preempt.SIGNALS)}


def _usr1(proc: subprocess.Popen) -> None:
    """mpirun passes SIGUSR1 on to every rank (SIGTERM it answers by killing them)."""
    _signal(proc, signal.SIGUSR1, False)


HOST_ARGS = ("-H", "--host", "-host", "--hostfile", "-hostfile", "--machinefile", "-machinefile",
             "--default-hostfile")
ALLOCATIONS = ("SLURM_JOB_ID", "PBS_NODEFILE", "LSB_HOSTS", "OMPI_MCA_orte_default_hostfile")


def _ranks_here(mpirun_args, environ) -> bool:
    """Whether mpirun will start every rank on this host (no hosts named, no allocation): only
    then can this host's GPUs tell whether the ranks' device setting can be met."""
    named = any(a.split("=", 1)[0] in HOST_ARGS for a in mpirun_args)
    return not named and not any(k in environ for k in ALLOCATIONS)


def _spark(args) -> int:
    from .launchers.spark import classcache, submit

    args.out = args.out or default_out(args.config)
    spark_submit = find_executable("spark-submit")
    if spark_submit is None:
        raise UserError("no spark-submit found: install pyspark with `pip install 'dist-train[spark]'`")
    usercode.search_config_dir(args.config)
    shipped = usercode.local_files(config.load(args.config, args.set))  # the user's modules, to the executors
    env = spark_env()
    archive, finish = classcache.driver_options(args.spark_arg, env, failures.say)  # the driver JVM's classes, loaded once
    cmd = [spark_submit] + (["--master", args.master] if args.master else []) + archive + args.spark_arg
    cmd += (["--py-files", ",".join(map(str, shipped))] if shipped else []) + [submit.__file__] + job_argv(args)
    failures.say("+ " + shlex.join(map(str, cmd)))
    env.setdefault(STARTED_ENV, repr(time.time()))  # the metrics' wall clock counts the JVM's start-up too
    code, signalled = 1, True
    try:
        code, signalled = supervise(cmd, env, whole_group=True, out=Path(args.out))
    finally:  # a JVM that ended by itself wrote its whole archive, whatever the job's fate
        finish(not signalled and code < 128)
    return code


def _config(args) -> int:
    if args.config is None:
        if args.set:
            raise UserError("dist-train config: --set needs a CONFIG to apply to")
        print(config.describe())
        return 0
    import yaml

    usercode.search_config_dir(args.config)
    print(yaml.safe_dump(config.to_dict(config.load(args.config, args.set)), sort_keys=False).rstrip())
    return 0


def _plot(args) -> int:
    from .plot import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out)}", file=sys.stderr)
    return 0


def _use(args) -> int:
    from . import use
    from .data.items import jsonable

    if args.command == "eval":
        print(json.dumps(jsonable(use.evaluate_run(args.run_dir, args.data, trust_code=args.trust_code)),
                         allow_nan=False))
    elif args.command == "predict" and args.spark:
        rows = _spark_predict(args)
        print(f"wrote {rows} predictions to {args.out}", file=sys.stderr)
    elif args.command == "predict":
        rows = use.predict_run(args.run_dir, args.input, args.out, trust_code=args.trust_code,
                               probabilities=args.probabilities)
        print(f"wrote {rows} predictions to {args.out}", file=sys.stderr)
    elif args.command == "export":
        print(f"wrote {use.export_run(args.run_dir, args.format, args.out, trust_code=args.trust_code)}",
              file=sys.stderr)
    else:
        use.print_info()
    return 0


def _spark_predict(args) -> int:
    from .launchers.spark import ml
    from .launchers.spark.session import session

    if not Path(args.input).exists():
        raise UserError(f"{args.input} does not exist")
    if args.probabilities:
        raise UserError("--probabilities is not available with --spark: predict without --spark, or add a softmax "
                        "over the Model's prediction column in Spark")
    spark = session("dist-train-predict", master=args.master or "local[*]")
    try:
        return ml.predict_parquet(spark, args.run_dir, args.input, args.out, trust_code=args.trust_code)
    finally:
        spark.stop()


COMMANDS = {"local": _local, "mpi": _mpi, "spark": _spark, "config": _config, "plot": _plot,
            "eval": _use, "predict": _use, "export": _use, "info": _use}


def supervise(cmd: list[str], env: dict, *, whole_group: bool, out: Path | None = None,
              relay: Callable[[subprocess.Popen], None] | None = None) -> tuple[int, bool]:
    """Run `cmd` in a session of its own and wait for it; this process returns its exit code.

    A first SIGINT, SIGTERM, SIGHUP or SIGUSR1 to this process, once the job trains (its
    metrics.jsonl in `out` was written after the start): the job is asked to checkpoint
    and stop (preempt.ask: the stop file; `relay(proc)` may tell it more directly) and
    gets STOP_GRACE_S to do so. Before that, or on a second signal, or when the grace is
    up: SIGTERM (`whole_group`: every process of its group, as spark-submit's JVM, driver
    and Python workers are; else the child only, as mpirun ends its ranks itself), and
    what still runs KILL_AFTER_S later is killed; this process then returns 128 + the
    signal. If this process dies, the child gets SIGTERM (Linux). Returns (the exit code,
    whether this process was signalled)."""
    got: list[tuple[int, float]] = []
    proc, started, asked = None, time.time(), []

    def forward(signum, frame):
        got.append((signum, time.monotonic()))
        if proc is None:
            return
        if len(got) == 1 and out is not None and _training_since(out, started):
            preempt.ask(out, signum)  # the job checkpoints at its next step and leaves by itself
            asked.append(time.monotonic())
            if relay is not None:
                relay(proc)
            failures.say(f"[dist-train] {signal.Signals(signum).name}: asked the job to checkpoint and stop "
                         f"(within {STOP_GRACE_S:.0f} s; again to stop at once)")
        elif asked and len(got) == 2:  # the stop asked is not awaited: end it as a first signal would
            _signal(proc, signal.SIGTERM, whole_group)
        else:
            _signal(proc, signal.SIGTERM if len(got) == 1 else signal.SIGKILL, whole_group or len(got) > 1)

    previous = {s: signal.signal(s, forward) for s in (*preempt.SIGNALS, signal.SIGHUP)}
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_term_with_parent)  # (before exec)
        if got:  # a signal came while it started
            _signal(proc, signal.SIGTERM, whole_group)
        code = _wait(proc, got, asked, whole_group)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    _signal(proc, signal.SIGKILL, True)  # anything of its group left behind (it is gone itself)
    if not got or (asked and len(got) == 1):  # the job's own end (128 + the signal: it stopped as asked)
        return (code if code >= 0 else 128 - code), bool(got)  # killed by a signal: the shell's convention
    failures.say(f"error: interrupted by {signal.Signals(got[0][0]).name}: {Path(cmd[0]).name} and its workers "
                 f"were stopped")
    return 128 + got[0][0], True


def _wait(proc: subprocess.Popen, got: list, asked: list, whole_group: bool) -> int:
    """The child's exit code, killing it where a stop it was asked for takes too long."""
    while True:
        try:
            return proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            now = time.monotonic()
            if asked and len(got) == 1 and now - asked[0] > STOP_GRACE_S:
                failures.say(f"[dist-train] the job did not stop within {STOP_GRACE_S:.0f} s; ending it")
                got.append((got[0][0], now))
                _signal(proc, signal.SIGTERM, whole_group)
            elif got and not (asked and len(got) == 1) and now - got[-1][1] > KILL_AFTER_S:
                _signal(proc, signal.SIGKILL, True)


def _training_since(out: Path, started: float) -> bool:
    """Whether the job trains: its metrics.jsonl was written after `started` (rank 0 opens it
    just before the first step). Before that there is nothing to checkpoint."""
    try:
        return (out / "metrics.jsonl").stat().st_mtime >= started - 1.0
    except OSError:
        return False


def _signal(proc: subprocess.Popen, signum: int, whole_group: bool) -> None:
    try:
        if whole_group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
    except (ProcessLookupError, PermissionError):
        pass


def _term_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent (this process) dies."""
    failures.kill_with_parent(signal.SIGTERM)


def spark_env() -> dict:
    """spark-submit from a venv that is not activated: let it find this Python (driver and executors)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYSPARK_PYTHON", sys.executable)
    env.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    return env


if __name__ == "__main__":
    sys.exit(main())
