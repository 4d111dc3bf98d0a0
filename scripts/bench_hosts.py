"""The cross-host exchange for real on one machine, beside the cost model's prediction.

    .venv/bin/python scripts/bench_hosts.py [--ranks 4] [--hosts 2] [--reps 30]
                                            [--bench docs/bench.json] [--bandwidth-gbs 10] [--latency-us 10]

`mpirun -n ranks` with the ranks posed as `hosts` hosts (rank r on host r % hosts, as
tests/mpi_hosts_worker.py does), so both legs of the hierarchical sum run: shared memory
among a host's ranks, then MPI between the hosts, local rank i carrying part i. For each
workload's gradient bytes (from the bench's results) every rank times, fastest of --reps
(see timed), the slowest rank's figure:

- full: the gradient buffer's allreduce through the whole stack (comm.connect);
- host leg: the same sum among one host's ranks alone (shared memory only);
- cross leg: each local rank's part (bytes / ranks per host) allreduced by MPI between
  the hosts, every local rank at once, as the full path does.

The model (scripts/cost_model.py's ring, made hierarchical) predicts the full exchange
as host leg + ring(hosts, bytes / ranks per host): on this machine the "network" between
posed hosts is MPI's shared-memory transport, whose bandwidth and per-hop latency are
fitted here from a 2-rank MPI Allreduce of 8 bytes and of 64 MB. For 8, 64 and 512 workers
it keeps the measured host leg and puts --bandwidth-gbs / --latency-us links between hosts
of the same ranks per host, with the bench's compute time per step (its no-sync row).
The ranks outnumber the cores (4 on 2): the figures are the exchange's, not training's,
and Open MPI is asked to yield while it waits (mpi_yield_when_idle: without it, ranks
polling for one message kept the cores from the ranks that would send it, and the full
exchange took 2-5x its two legs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

WORKER_FLAG = "--worker"


def timed(fn, reps: int, barrier) -> float:
    """The fastest of reps calls of fn(), in ms, each started together (a barrier before
    it). With more ranks than cores a call's time also holds its waits for a core, which
    vary several-fold from run to run; the fastest call is the exchange's own cost."""
    fn()  # first call: segments mapped, pages faulted
    times = []
    for _ in range(reps):
        barrier()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1000


def worker(sizes: dict, hosts: int, reps: int) -> None:
    import torch
    from mpi4py import MPI

    from dist_train import comm as comms
    from dist_train.comm import mpi
    from dist_train.comm.env import Environment

    torch.set_num_threads(1)
    world = mpi.world()
    rank, n = world.rank, world.world_size
    per_host = n // hosts
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[(rank // hosts) % len(cores)]})  # a host's ranks on different cores, as on a host
    barrier = MPI.COMM_WORLD.Barrier
    full = comms.connect(Environment("mpi", rank, n, hosts=tuple(f"host{r % hosts}" for r in range(n))),
                         timeout_s=120, base=world)
    host_group = mpi.MPIComm(MPI.COMM_WORLD.Split(rank % hosts, key=rank))  # this host's ranks
    host_only = comms.connect(Environment("mpi", host_group.rank, per_host, hosts=("h",) * per_host),
                              timeout_s=120, base=host_group)
    cross = mpi.MPIComm(MPI.COMM_WORLD.Split(rank // hosts, key=rank))  # local rank i of every host
    pair = MPI.COMM_WORLD.Split(0 if rank < 2 else MPI.UNDEFINED, key=rank)  # for the fit: ranks 0 and 1
    out = {}
    for name, nbytes in sizes.items():
        numel = nbytes // 4
        g = comms.buffer(full, numel, torch.float32, torch.device("cpu"))
        h = comms.buffer(host_only, numel, torch.float32, torch.device("cpu"))
        part = torch.zeros(-(-numel // per_host))
        out[name] = {"full": timed(lambda: full.allreduce(g), reps, barrier),
                     "host": timed(lambda: host_only.allreduce(h), reps, barrier),
                     "cross": timed(lambda: cross.allreduce(part), reps, barrier)}
        del g, h
    fit = {}
    for nbytes in (8, 64 << 20):
        buf = torch.zeros(max(nbytes // 4, 2))
        fit[nbytes] = timed(lambda: pair.Allreduce(MPI.IN_PLACE, buf.numpy()) if rank < 2 else None, reps, barrier)
    every = MPI.COMM_WORLD.gather({"measured": out, "fit": fit}, root=0)
    full.close()
    host_only.close()
    if rank == 0:
        print("RESULT " + json.dumps(every))


def main():
    if WORKER_FLAG in sys.argv:
        i = sys.argv.index(WORKER_FLAG)
        worker(json.loads(sys.argv[i + 1]), int(sys.argv[i + 2]), int(sys.argv[i + 3]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--hosts", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--bench", type=Path, default=ROOT / "docs" / "bench.json")
    ap.add_argument("--bandwidth-gbs", type=float, default=10.0, help="between hosts, for 8/64/512 workers")
    ap.add_argument("--latency-us", type=float, default=10.0, help="per hop between hosts, for 8/64/512 workers")
    a = ap.parse_args()
    if a.ranks % a.hosts or a.ranks // a.hosts < 2:
        sys.exit(f"error: --ranks {a.ranks} over --hosts {a.hosts}: each host needs the same number of ranks, >= 2")
    from cost_model import workloads

    from dist_train.launchers import mpi

    measured = workloads(a.bench)
    sizes = {w: int(m["bytes"]) for w, m in measured.items()}
    cmd = mpi.command(a.ranks, [sys.executable, __file__, WORKER_FLAG, json.dumps(sizes), str(a.hosts), str(a.reps)],
                      extra=["--mca", "btl", "self,sm"] if (mpi.open_mpi_major() or 0) >= 5 else [])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env={**os.environ, "OMP_NUM_THREADS": "1", "OMPI_MCA_mpi_yield_when_idle": "1"})
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode or line is None:
        sys.exit(f"error: mpirun exited {p.returncode}: {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
    ranks = json.loads(line[len("RESULT "):])
    per_host = a.ranks // a.hosts
    t8, t64 = (max(r["fit"][str(k)] for r in ranks[:2]) for k in (8, 64 << 20))
    alpha_ms = t8 / 2  # a 2-rank ring: 2 (p - 1) = 2 hops
    bw = (64 << 20) / ((t64 - t8) / 1000)  # bytes/s: 2 (p - 1) / p = 1
    print(f"\n{a.ranks} ranks posed as {a.hosts} hosts of {per_host} ({os.cpu_count()} cores), fastest of {a.reps}, "
          f"slowest rank; between posed hosts (MPI, shared memory): {bw / 1e9:.1f} GB/s, {alpha_ms * 1000:.0f} us "
          f"a hop (fitted)\n")
    print("| workload | MB | full ms | host leg ms | cross leg ms | model: host + ring(hosts) ms | full / model |")
    print("|---|---|---|---|---|---|---|")
    for w, nbytes in sizes.items():
        got = {k: max(r["measured"][w][k] for r in ranks) for k in ("full", "host", "cross")}
        ring = 2 * (a.hosts - 1) / a.hosts * nbytes / per_host / bw * 1000 + 2 * (a.hosts - 1) * alpha_ms
        model = got["host"] + ring
        print(f"| {w} | {nbytes / 1e6:.1f} | {got['full']:.2f} | {got['host']:.2f} | {got['cross']:.2f} | "
              f"{got['host']:.2f} + {ring:.2f} = {model:.2f} | {got['full'] / model:.2f}x |")
    print(f"\nPredicted with this host leg ({per_host} ranks a host) and {a.bandwidth_gbs:g} GB/s, {a.latency_us:g} us "
          f"links between hosts; step = compute (bench no-sync row) + exchange, no overlap:\n")
    print("| workload | compute ms | " + " | ".join(f"p={p}: exchange ms, efficiency" for p in (8, 64, 512)) + " |")
    print("|---" * 5 + "|")
    for w, m in measured.items():
        host_ms = max(r["measured"][w]["host"] for r in ranks)
        cells = []
        for p in (8, 64, 512):
            h = p // per_host
            t = host_ms + (2 * (h - 1) / h * m["bytes"] / per_host / (a.bandwidth_gbs * 1e9)
                           + 2 * (h - 1) * a.latency_us * 1e-6) * 1000
            cells.append(f"{t:.2f}, {m['c_ms'] / (m['c_ms'] + t):.0%}")
        print(f"| {w} | {m['c_ms']:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
