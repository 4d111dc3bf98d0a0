"""The barrier task: where am I (the Spark task's environment, its rendezvous), this
task's shard (feed.spool_shard), then the same `fit` as every launcher.

Under a local master every rank joins a TCPStore the driver opened on its loopback for
the attempt. Elsewhere rank 0 opens one on its executor's address and allGather shares
the port; the allGather runs in a thread from the task's first moment: Spark answers a
barrier call up to a second after the last task arrives, and the task spends that time
assembling its shard.
"""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, replace

from ... import data, device, failures
from ...comm import connect
from ...comm.env import Environment
from ...data.worker import head_hash
from ...errors import DataError, PeerFailure, Preempted, first_line
from ...files import attempt_fence
from ...train import fit
from ...train.clock import job_start
from . import feed, progress

PEER_LOSS_GRACE_S = 3.0  # a task that failed because a peer did waits, so the peer's own report reaches the driver first
WATCHDOG_GRACE_S = 10.0  # after the watchdog named a stalled peer, the task's own collective fails; else it leaves


RESULT_SCHEMA = "chunk int, payload binary"
STOPPED_CHUNK = -1  # rank 0's row when the job stopped on a request (preempt.py): the payload is its line
WRITTEN_CHUNK = -2  # rank 0's row when it wrote model.pt and summary.json into --out: the payload is the summary
# Without --out, rank 0's model and summary travel in pieces (spark.driver.maxResultSize bounds a collect); with
# one, rank 0 writes them there, as under every launcher (the wide MLP's 80 MB took ~3.7 s through torch.save,
# Arrow, the JVM and collect()), and sends the summary alone.
RESULT_CHUNK = 32 << 20


@dataclass(frozen=True)
class Gpus:
    """Where the tasks' GPUs come from: Spark's scheduler (`assigned`: each task reads
    TaskContext.resources()["gpu"]), or, under a local master, a `pool` the driver's host
    shares out by local rank (None: every GPU torch sees there)."""

    assigned: bool = False
    pool: tuple | None = None


class TrainTask:
    """mapInArrow's function of the barrier stage: without --out, rank 0 yields its model and
    summary in chunks; with one, it writes model.pt and summary.json there and yields the
    summary alone (a stopped job: rank 0's line)."""

    def __init__(self, cfg, world: int, source: feed.Source, out: str | None, resume: bool, attempt: int,
                 given: dict | None = None, progress_to=None, gpus: Gpus = Gpus(), store_at=None):
        self.cfg, self.world, self.out, self.resume, self.attempt = cfg, world, out, resume, attempt
        self.store_at = store_at  # (host, port) of the store the driver opened for this attempt, or None
        self.source = replace(source, df=None, dataset=None)  # what a task needs to know of it, not the rows
        self.given = given or {}  # the notebook's model, data and loss objects (pickled with the task)
        self.progress_to = progress_to  # the driver's progress port (no --out), as (host, port) candidates
        self.gpus = gpus
        self.job_started = job_start(default=time.time())  # the driver's: wall time counts Spark's start-up

    def __call__(self, batches):
        import pyarrow as pa
        from pyspark import BarrierTaskContext

        from ...train.checkpoint import to_bytes

        ctx = BarrierTaskContext.get()
        rank = ctx.partitionId()
        failures.reset()  # Spark reuses its Python workers: nothing of an earlier task counts
        failures.exit_with_parent(f"rank {rank}")  # the executor gone: do not train on
        try:
            result = self._train(ctx, rank, batches)
        except Preempted as e:  # stopped as asked, every task alike: no task failure (and no retry) for Spark
            if rank == 0:
                yield pa.record_batch({"chunk": pa.array([STOPPED_CHUNK], pa.int32()),
                                       "payload": pa.array([str(e).encode()], pa.binary())})
            return
        except BaseException as e:  # noqa: BLE001 - the driver gets one line naming the rank and the cause
            raise RuntimeError(_report(e, rank)) from None
        finally:
            failures.reset()  # no deferred exit may outlive this task into the next
        if rank == 0 and self.out is not None:  # model.pt is in --out, which the driver shares
            yield pa.record_batch({"chunk": pa.array([WRITTEN_CHUNK], pa.int32()),
                                   "payload": pa.array([to_bytes(result.summary)], pa.binary())})
        elif rank == 0:
            blob = to_bytes({"model": result.model_payload(self.cfg), "summary": result.summary})
            for i, at in enumerate(range(0, len(blob), RESULT_CHUNK)):
                yield pa.record_batch({"chunk": pa.array([i], pa.int32()),
                                       "payload": pa.array([blob[at:at + RESULT_CHUNK]], pa.binary())})

    def _train(self, ctx, rank, batches):
        rendezvous = Rendezvous(ctx, rank, self.world, self.store_at)
        shard = self._shard(rank, batches)
        env, store = rendezvous.finish()
        choice = self._device(ctx, env)
        comm = connect(env, timeout_s=self.cfg.comm.timeout_s, shm=self.cfg.comm.shm, store=store,
                       fail=failures.deferred_exit(WATCHDOG_GRACE_S))
        threads = device.set_threads(device.thread_budget(1, cores=ctx.cpus(), override=self.cfg.threads,
                                                          data_workers=getattr(shard, "workers", 0)))
        sender = progress.Sender(self.progress_to) if rank == 0 and self.progress_to else None
        try:
            with failures.leaving(comm):
                return fit(self.cfg, comm, shard, out_dir=self.out, resume=self.resume, launcher="spark",
                           device=choice, threads=threads, fence=attempt_fence(self.out, self.attempt),
                           quiet=True,  # the driver shows the progress (metrics.jsonl, or what rank 0 sends)
                           model=self.given.get("model"), loss=self.given.get("loss"), on_record=sender,
                           job_started=self.job_started)
        except BaseException as e:
            if failures.kind_of(e).abort:  # "aborting" is failing this task: Spark ends the stage's others
                failures.abort_world(lambda code: None, 1)
                comm.close()  # the worker process is reused: leave no process group behind
            raise
        finally:
            if sender is not None:
                sender.close()

    def _device(self, ctx, env) -> device.Choice:
        """This task's device: the GPU Spark assigned it, or, under a local master, the
        driver's by local rank (device.choose)."""
        assigned = None
        if self.gpus.assigned:
            found = ctx.resources().get("gpu")
            assigned = list(found.addresses) if found is not None else []
        return device.for_worker(self.cfg, env.local_rank, env.local_size, assigned=assigned, pool=self.gpus.pool)

    def _shard(self, rank: int, batches):
        """This task's data: its shard's rows spooled to local disk, or the user's or a built-in
        dataset made here."""
        if not (self.source.items or self.source.made):
            return feed.spool_shard(rank, self.world, batches, self.source, self.cfg.data.cache_dir,
                                    self.cfg.data.resident_mb << 20, self.cfg.data.shuffle_window)
        for _ in batches:  # the input is one row: read it, as the stage expects
            pass
        if self.source.made:
            ds = data.load(self.cfg)
            if head_hash(ds.x, ds.y) != self.source.made or len(ds) != self.source.n:
                raise DataError(f"{self.cfg.data.name}: this executor makes other rows than the driver did "
                                f"(another numpy or dist-train there?): install the driver's versions")
            return data.WorkerData.whole(ds, self.source.outputs, resident=self.cfg.data.resident_mb << 20,
                                         window=self.cfg.data.shuffle_window)
        items = data.load(self.cfg, self.given.get("data"))
        items.outputs = self.source.outputs
        return items

def _report(e: BaseException, rank: int) -> str:
    """`[rank R] Kind: cause` (the failure table's kind, by the exception's name), then the traceback."""
    if failures.DIAGNOSIS and not isinstance(e, PeerFailure):  # the watchdog named the cause: this is its consequence
        e = PeerFailure(failures.DIAGNOSIS[0])
    elif _is_peer_loss(e):  # a consequence, not the cause: let the failing rank's report reach the driver first
        time.sleep(PEER_LOSS_GRACE_S)
    name = type(e).__name__
    cause = f"rank {rank} exited at step {failures.PROGRESS.step}" if isinstance(e, SystemExit) else str(e) or name
    return f"[rank {rank}] {name}: {cause}\n{''.join(traceback.format_exception(e))}"


def _is_peer_loss(e: BaseException) -> bool:
    text = first_line(e, 10_000)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                   "exited at step", "Timed out"))


class Rendezvous:
    """The Spark barrier task's environment: rank and world from the stage, every task's
    host from getTaskInfos, and the store every rank joins: the one the driver opened
    (`store_at`: under a local master, where every task runs on the driver's host), else
    rank 0's, its port shared by allGather (which Spark answers up to a second after the
    last task asks: 0.7 s of a short job's wall time here)."""

    def __init__(self, ctx, rank: int, world: int, store_at=None):
        from ...comm import torchdist

        self.rank, self.world, self.store_at = rank, world, store_at
        self.hosts = tuple(info.address.rsplit(":", 1)[0] for info in ctx.getTaskInfos())
        if len(self.hosts) != world:  # every rank would wait for ranks that never come
            raise RuntimeError(f"the barrier stage has {len(self.hosts)} tasks, spark.workers is {world}")
        self.gathered, self.error, self.store, self.thread = None, None, None, None
        if store_at is not None:
            return
        self.store, port = torchdist.listen(self.hosts[0]) if rank == 0 else (None, 0)
        self.thread = threading.Thread(target=self._gather, args=(ctx, str(port)), daemon=True,
                                       name="dist-train-rendezvous")
        self.thread.start()

    def _gather(self, ctx, mine):
        try:
            self.gathered = ctx.allGather(mine)  # dist: rendezvous through Spark
        except BaseException as e:  # noqa: BLE001 - re-raised by finish() in the task's thread
            self.error = e

    def finish(self) -> tuple[Environment, object]:
        if self.store_at is not None:  # the driver's: every rank joins it
            (address, port), running = self.store_at, True
        else:
            self.thread.join()
            if self.error is not None:
                raise self.error
            address, port, running = self.hosts[0], int(self.gathered[0]), False
        mine = self.hosts[self.rank]
        local = [r for r, h in enumerate(self.hosts) if h == mine]
        env = Environment("spark", self.rank, self.world, local.index(self.rank), len(local), address, port,
                          self.hosts, mine, store_running=running)
        return env, self.store
