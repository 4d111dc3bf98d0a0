"""Spark launcher, the driver's side: preflight, the barrier job and its retries, progress.

    spark-submit --master 'local[2]' launchers/spark.py conf/digits.yaml --out /shared/runs/digits
    dist-train spark conf/digits.yaml --out /shared/runs/digits --master spark://host:7077

Success: the driver prints `[dist-train] spark: done ...` and exits 0; --out (a path the
driver and every executor share) holds model.pt, summary.json, metrics.jsonl and
checkpoints/. If a task fails, the job ends within seconds and the driver prints
`error: [rank R] <cause>`, exiting with the failure table's code (failures.py); with
`spark.max_attempts > 1` it retries from the newest checkpoint first.

From a notebook, inside an existing SparkSession:

    from dist_train.launchers.spark import train
    result = train(spark, "conf/digits.yaml", df=my_dataframe, out_dir="/shared/runs/x")
    result.model  # the trained torch.nn.Module

The data feed is feed.py, the barrier task task.py; gradients travel among the tasks
with torch.distributed (gloo) and shared memory, never through the driver. The Spark
launcher's modules are the only ones that import pyspark.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from ... import config, data, device, failures, models, preempt, usercode
from ...errors import ConfigError, UserError
from ...files import ATTEMPT_NAME, OutLock, check_unlocked, claim_attempt
from ...train import Result, tracking, validate
from ...train.checkpoint import load_bytes
from ...train.summary import count, eval_text
from ...train.outputs import load_model_file, prepare_out_dir, summary_text
from ..args import job_parser
from ..common import out_dir
from . import feed, progress
from .session import session
from .task import RESULT_SCHEMA, STOPPED_CHUNK, WRITTEN_CHUNK, Gpus, TrainTask


class TrainingFailed(RuntimeError):
    """The barrier job failed (after every allowed attempt); the message names the rank,
    `exit_code` is the failure table's for its kind."""

    def __init__(self, line: str):
        super().__init__(line)
        kind = re.match(r"\[rank \d+\] (\w+):", line)
        self.exit_code = failures.exit_code_of(kind.group(1), line) if kind else 1
        self.preempted = kind is not None and kind.group(1) == "Preempted"  # stopped as asked: no retry


# ---------------------------------------------------------------- before the job


def preflight(spark, cfg) -> Gpus:
    """Fail at once where Spark itself would wait ~10 minutes (barrier slot re-checks) or refuse;
    where the tasks' GPUs come from (gpus). Reads the conf through the session (DataFrame
    API: Spark Connect has no SparkContext)."""
    if conf(spark, "spark.dynamicAllocation.enabled", "false").lower() == "true":
        raise UserError("Spark barrier mode cannot run with dynamic allocation: "
                        "set spark.dynamicAllocation.enabled=false")
    if cfg.data.sampling != "shard":
        raise ConfigError("data.sampling", "Spark tasks each read only their own partition: use shard")
    need, task_cpus = cfg.spark.workers, int(conf(spark, "spark.task.cpus", "1"))
    master = conf(spark, "spark.master", "")
    cores = master_cores(master, os.cpu_count() or 1) if master else None
    slots = cores // task_cpus if cores is not None else _cluster_slots(spark, task_cpus, need)
    if slots is not None and slots < need:
        raise UserError(f"spark.workers={need} needs {need} free task slots, the cluster has {slots} "
                        f"({master}: {slots * task_cpus} cores / spark.task.cpus={task_cpus}): lower spark.workers "
                        f"or add executors/cores (a barrier stage waits ~10 minutes before Spark gives up)")
    return gpus(spark, cfg, master)


def gpus(spark, cfg, master: str) -> Gpus:
    """The GPU plan of the job, or one line where the conf cannot give `device` what it asks."""
    task = conf(spark, "spark.task.resource.gpu.amount", "")
    if cfg.device == "cpu":
        return Gpus()
    if cfg.device.startswith("cuda:"):
        raise ConfigError("device", f"{cfg.device}: a Spark task uses the GPU Spark assigns it (or, under a local "
                                    f"master, one by local rank): use cuda or auto")
    if master.startswith("local") and not master.startswith("local-cluster"):
        if task:  # verified on Spark 4: the local backend offers no GPU slots, so the stage never starts
            raise UserError(f"spark.task.resource.gpu.amount={task} under a local master: Spark never schedules "
                            f"such tasks (the job would wait forever); unset it: local tasks take the driver's "
                            f"GPUs by local rank")
        sc = classic_context(spark)
        found = sc.resources.get("gpu") if sc is not None else None
        plan = Gpus(pool=tuple(found.addresses) if found is not None else None)
        device.preflight(cfg, cfg.spark.workers, pool=plan.pool)  # all tasks on this host: enough GPUs?
        return plan
    if not task:
        if cfg.device == "cuda":
            raise UserError("device: cuda on a Spark cluster needs GPU scheduling: set "
                            "spark.executor.resource.gpu.amount, spark.task.resource.gpu.amount (1: a GPU per "
                            "task) and spark.executor.resource.gpu.discoveryScript")
        return Gpus(assigned=True)  # auto: each task finds none assigned, and computes on its CPU
    if not conf(spark, "spark.executor.resource.gpu.amount", ""):
        raise UserError(f"spark.task.resource.gpu.amount={task} without spark.executor.resource.gpu.amount: "
                        f"set both (and spark.executor.resource.gpu.discoveryScript)")
    if _float(task, "spark.task.resource.gpu.amount") < 1 and not cfg.comm.share_gpus:
        raise UserError(f"spark.task.resource.gpu.amount={task} puts several tasks on one GPU: set "
                        f"comm.share_gpus: true to allow it, or use 1")
    return Gpus(assigned=True)


def _float(value: str, key: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise UserError(f"{key}={value!r}: not a number") from None


def conf(spark, key: str, default: str) -> str:
    try:
        value = spark.conf.get(key, None)
    except Exception:  # noqa: BLE001 - a Connect server may refuse to read a static key
        value = None
    return default if value is None else str(value)


def classic_context(spark):
    """The SparkContext of a classic session, None for a Spark Connect one (which has none)."""
    if type(spark).__module__.startswith("pyspark.sql.connect"):
        return None
    return spark.sparkContext


def master_cores(master: str, host_cores: int) -> int | None:
    """The cores of a local master (None for a cluster's, which its executors tell):
    local -> 1, local[N] and local[N,F] -> N, local[*] -> this host's, local-cluster[W,C,M]
    -> W x C. UserError for a master string this cannot read (Spark would not start)."""
    if master == "local":
        return 1
    m = re.fullmatch(r"local\[(\d+|\*)(?:,\s*\d+)?\]", master)
    if m:
        return host_cores if m.group(1) == "*" else int(m.group(1))
    m = re.fullmatch(r"local-cluster\[\s*(\d+)\s*,\s*(\d+)\s*,\s*\d+\s*\]", master)
    if m:
        return int(m.group(1)) * int(m.group(2))
    if re.match(r"(spark|k8s|mesos)://.+|yarn$|yarn-", master):
        return None
    raise UserError(f"spark master {master!r}: not a master this launcher can count task slots for "
                    f"(local, local[N], local[*], local-cluster[W,C,M], spark://..., yarn, k8s://...)")


def _cluster_slots(spark, task_cpus: int, need: int, wait_s: float = 10.0) -> int | None:
    """Task slots = executor cores / spark.task.cpus; give executors a moment to register.
    None where the session cannot tell (Spark Connect to a cluster: Spark then waits itself)."""
    sc = classic_context(spark)
    if sc is None:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        slots = sc.defaultParallelism // task_cpus
        if slots >= need or time.monotonic() > deadline:
            return slots
        time.sleep(0.5)


def _source(spark, cfg, df, given: dict) -> feed.Source:
    if df is not None:
        return feed.dataframe_source(cfg, df)
    if given.get("data") is not None or cfg.data.target:
        items = data.load(cfg, given.get("data"))
        validate.check(cfg, items, given.get("model"), given.get("loss"))
        return feed.items_source(items)
    if cfg.data.name == "parquet":
        return feed.parquet_source(spark, cfg)
    ds = data.load(cfg)
    outputs = validate.check(cfg, ds, given.get("model"), given.get("loss"))
    if cfg.data.name in data.BUILT_IN:  # each task makes it: no rows travel
        return feed.builtin_source(cfg, ds, outputs)
    return feed.dataset_source(cfg, ds, outputs)


def ship_user_code(spark, cfg) -> None:
    """The user's modules that are local files reach every executor (addPyFile, or
    addArtifacts over Spark Connect), unless spark-submit's --py-files shipped them already."""
    sc = classic_context(spark)
    shipped = {Path(p.split(":", 1)[-1]).name for p in conf(spark, "spark.submit.pyFiles", "").split(",") if p}
    for path in usercode.local_files(cfg):
        if path.name in shipped:
            continue
        if sc is not None:
            sc.addPyFile(str(path))
        else:
            spark.addArtifacts(str(path), pyfile=True)


def executors_python(spark) -> None:
    """Executors start `python3` unless told otherwise, which is rarely the Python that has
    torch: a classic session whose user set neither PYSPARK_PYTHON nor spark.pyspark.python
    gets this driver's interpreter (what a local master, the notebook case, needs)."""
    sc = classic_context(spark)
    if sc is None or os.environ.get("PYSPARK_PYTHON") or conf(spark, "spark.pyspark.python", ""):
        return
    sc.pythonExec = sys.executable


_PROBE = """
def probe(_):
    import importlib, sys
    found, missing = [], ""
    for name in ("torch", "dist_train"):
        try:
            found.append(getattr(importlib.import_module(name), "__version__", "?"))
        except Exception as e:
            missing = missing or f"{name} ({type(e).__name__}: {e})"
    if not missing:
        try:  # what the barrier task imports: Spark reuses this Python worker for it
            importlib.import_module("dist_train.launchers.spark.task")
        except Exception:
            pass
    return "\\n".join([sys.executable, " ".join(found), missing])
"""


def check_executors(spark, workers: int = 1) -> None:
    """One small task per worker first: an executor whose Python cannot import torch or
    dist_train is one line here, not a barrier stage's failure text; and the Python workers
    the barrier stage then reuses have imported what its tasks need (~2 s each here, in
    parallel now, where the stage would start them one after the other). The probe is a
    plain Python UDF (no Arrow, which needs pyarrow there) compiled outside any module, so
    cloudpickle ships it by value and it runs where dist_train is missing."""
    from pyspark.sql import functions as F

    namespace = {"__name__": "dist_train_probe"}
    exec(compile(_PROBE, "<dist-train probe>", "exec"), namespace)  # noqa: S102 - our own constant source
    probe = F.udf(namespace["probe"], "string", useArrow=False)
    try:
        answers = [row[0].split("\n") for row in spark.range(workers, numPartitions=workers).select(probe("id")).collect()]
        python, _versions, missing = next((a for a in answers if a[2]), answers[0])
    except Exception as e:  # noqa: BLE001 - the worker could not even start: find why in Spark's text
        gone = re.search(r"No module named '([\w.]+)'", str(e))
        if gone is None:
            raise
        python, missing = conf(spark, "spark.pyspark.python", os.environ.get("PYSPARK_PYTHON", "python3")), gone[1]
    if missing:
        raise UserError(f"the executors' Python ({python}) cannot import {missing}: install dist-train there, "
                        f"or point spark.pyspark.python (PYSPARK_PYTHON) at a Python that has it")


# ---------------------------------------------------------------- the job


def say(line: str) -> None:
    print(line, flush=True)  # progress, even when stdout is a pipe (spark-submit under a scheduler, a log file)


def train(spark, cfg, df=None, *, sets=(), out_dir=None, resume: bool = False, log=say, model=None, data=None,
          loss=None) -> Result:
    """Train on Spark; returns rank 0's Result (`.model`, `.summary`). `cfg` is a config
    path or a loaded config; `df`, if given, is the data (label column `data.label_column`);
    `model`, `data` (a map-style dataset, or a factory) and `loss` stand in for what the
    config names, as in dist_train.fit (they are pickled to the tasks). Raises
    TrainingFailed (its `exit_code` from the failure table) if the job fails."""
    if not isinstance(cfg, dict):
        usercode.search_config_dir(cfg)
        cfg = config.load(cfg, list(sets))
    given = {"model": model, "data": data, "loss": loss}
    config.check_world(cfg, cfg.spark.workers)
    tracking.resolve_uri(cfg)  # rank 0 tracks from an executor: give it the driver's MLflow URI
    plan = preflight(spark, cfg)
    out = Path(out_dir).resolve() if out_dir else None
    if out is not None:
        check_unlocked(out)  # a run in progress there: say that, not what its files look like
        prepare_out_dir(out, resume)
    executors_python(spark)
    ship_user_code(spark, cfg)
    log("[dist-train] spark: checking the executors and the data")
    check_executors(spark, cfg.spark.workers)
    source = _source(spark, cfg, df, given)
    lock = OutLock(out).acquire() if out is not None else None  # the driver writes the run: it holds --out
    try:
        if out is not None:
            prepare_out_dir(out, resume)  # again, now that no other run can start on it
        return _run_attempts(spark, cfg, source, out, resume, log, given, plan)
    finally:
        if lock is not None:
            lock.release()


def _run_attempts(spark, cfg, source: feed.Source, out: Path | None, resume: bool, log, given: dict,
                  gpus: Gpus) -> Result:
    world = cfg.spark.workers
    shards = feed.shard(spark, source, world)
    for attempt in range(1, cfg.spark.max_attempts + 1):
        if out is not None:
            claim_attempt(out, attempt)  # fences off older attempts
        store, store_at = _driver_store(spark)
        if out is not None:  # rank 0 writes metrics.jsonl where the driver can read it
            follower, addresses = progress.FileFollower(out / "metrics.jsonl", log), None
        else:  # rank 0 sends its records to the driver
            follower = progress.Listener(log, conf(spark, "spark.driver.host", ""))
            addresses = follower.addresses
        task = TrainTask(cfg, world, source, str(out) if out else None, resume, attempt, given, addresses, gpus,
                         store_at)
        log(f"[dist-train] spark: starting {world} barrier tasks (attempt {attempt})")
        try:
            with _stop_requests(out):
                chunks = shards.mapInArrow(task, RESULT_SCHEMA, barrier=True).collect()
            break
        except Exception as e:  # noqa: BLE001 - Py4JJavaError and friends: find the rank's message
            failed = TrainingFailed(task_error(e))
            if attempt == cfg.spark.max_attempts or failed.preempted:
                raise failed from None
            cause = str(failed)
            failures.say(f"[dist-train] spark: attempt {attempt} failed: {cause}; retrying from the newest checkpoint")
            resume = True
        finally:
            if follower is not None:
                follower.stop()
            del store  # the attempt's store closes with it: a retry's ranks meet in a new one
    stopped = [row["payload"].decode() for row in chunks if row["chunk"] == STOPPED_CHUNK]
    if stopped:
        raise TrainingFailed(f"[rank 0] Preempted: {stopped[0]}")
    if out is not None:  # rank 0 wrote model.pt and summary.json there, as under every launcher
        payload = _written(out, chunks)
    else:
        payload = load_bytes(b"".join(row["payload"] for row in sorted(chunks, key=lambda row: row["chunk"])))
    return _result(cfg, source, payload, out, world, log, given.get("model"))


def _driver_store(spark):
    """Under a local master (a classic session: every task runs on this host), a store on
    this host's loopback that the attempt's ranks join, so they meet without allGather,
    which Spark answers up to a second after the last task asks. (store, (host, port)),
    or (None, None) elsewhere: there rank 0 opens one and allGather shares its port."""
    if classic_context(spark) is None or not conf(spark, "spark.master", "").startswith("local"):
        return None, None
    from ...comm import torchdist

    store, port = torchdist.listen("127.0.0.1")
    return store, ("127.0.0.1", port)


@contextlib.contextmanager
def _stop_requests(out: Path | None):
    """While the barrier job runs: a signal to this driver asks the tasks to checkpoint and
    stop (the stop file in --out, which rank 0 looks for); a second one, or one without an
    --out to write it in, interrupts at once (Spark then cancels the job)."""
    if out is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def caught(signum, frame):
        if (out / preempt.STOP_FILE).exists():
            raise KeyboardInterrupt(signal.Signals(signum).name)
        preempt.ask(out, signum)
        failures.say(f"[dist-train] spark: {signal.Signals(signum).name}: asked the tasks to checkpoint and stop")

    previous = {s: signal.signal(s, caught) for s in preempt.SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _result(cfg, source, payload: dict, out: Path | None, world: int, log, given_model=None) -> Result:
    model = models.build(cfg, source.sample_shape, source.outputs, given=given_model)
    model.load_state_dict(payload["model"]["state_dict"])
    result = Result(payload["model"]["state_dict"], payload["summary"], model)
    if out is not None:
        (out / ATTEMPT_NAME).unlink(missing_ok=True)
    log(f"[dist-train] spark: done: {count(result.summary['steps'], 'step')} on {count(world, 'worker')}, "
        f"{eval_text(result.summary['eval'])}" + (f", outputs in {out}" if out else ""))
    return result


def _written(out: Path, chunks) -> dict:
    """The model.pt rank 0 wrote into --out, with the summary it sent: the summary.json
    beside it (written after it) must be that one, or these files are another run's."""
    sent = [load_bytes(row["payload"]) for row in chunks if row["chunk"] == WRITTEN_CHUNK]
    found = out / "summary.json"
    if not (sent and found.is_file() and found.read_text() == summary_text(sent[0]) and (out / "model.pt").is_file()):
        raise UserError(f"rank 0 wrote model.pt and summary.json into --out {out} on its executor, and this driver "
                        f"does not find them there: --out must be a path the driver and every executor share")
    return {"model": load_model_file(out / "model.pt"), "summary": sent[0]}


def task_error(e: BaseException) -> str:
    """The `[rank R] Kind: cause` line our task raised, out of Spark's long error text."""
    text = str(e)
    found = re.findall(r"(\[rank \d+\] [^\n]*)", text)
    if found:
        return found[0]
    for line in text.splitlines():
        if "Error" in line or "Exception" in line:
            return line.strip()[:500]
    return text.strip().splitlines()[0][:500] if text.strip() else type(e).__name__


# ---------------------------------------------------------------- spark-submit


def main(argv: list[str] | None = None) -> int:
    """spark-submit's entry: 0 on success; a failure exits with the failure table's code."""
    return failures.run(lambda: _submit(argv), rank=lambda: 0, world=lambda: 1, abort=lambda code: None)


def _submit(argv) -> None:
    args = job_parser("launchers/spark.py").parse_args(argv)
    usercode.search_config_dir(args.config)
    cfg = config.load(args.config, args.set)  # refuse bad input before the JVM's seconds of start-up
    out = out_dir(args)
    spark = session()
    # No spark.stop() here: this process ends next, and the JVM stops the context from its
    # shutdown hook as it goes (~0.1 s); pyspark's stop() waits up to a second on its
    # accumulator server's select loop first (~0.9 s of a short job's wall time).
    try:
        train(spark, cfg, out_dir=out, resume=args.resume)
    except TrainingFailed as e:
        failures.say(re.sub(r"^\[rank \d+\] Preempted: ", "[dist-train] ", str(e)) if e.preempted else f"error: {e}")
        raise SystemExit(e.exit_code) from None
