"""Throughput benchmark: dist-train against its peers on the same cores, in one run.

    .venv/bin/python scripts/bench.py            # 3 repetitions, median
    .venv/bin/python scripts/bench.py --quick    # 1 repetition, fewer steps

Workloads: conf/bench_mlp.yaml (784-512-512-10), bench_lenet.yaml, bench_wide.yaml
(784-4096-4096-10), global batch 128, synthetic MNIST-shaped data. Reported: steady-state
training samples/s (the first steps left out), the median over repetitions.

Rows:
- local:          dist-train local mode (one process, all cores)
- mpi-2:          dist-train under mpirun -n 2 (threads: cores / ranks = 1 each)
- mpi-2 default:  the same with torch's default thread count (the thread budget's effect)
- ddp-2:          PyTorch DDP, gloo, torchrun --nproc_per_node 2, 1 thread each
- spark-2:        dist-train under spark-submit --master local[2], 2 workers
- tdist-2:        pyspark's TorchDistributor (2 tasks on local[2]) running the DDP loop

For the Spark rows the end-to-end wall time of the whole short job (JVM start included)
is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WORKLOADS = {"mlp": "conf/bench_mlp.yaml", "lenet": "conf/bench_lenet.yaml", "wide": "conf/bench_wide.yaml"}
ROOT_FLAG = ["--allow-run-as-root"] if os.geteuid() == 0 else []


def _env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e.setdefault("PYSPARK_PYTHON", sys.executable)
    e.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    return e


def _run(cmd, timeout=600) -> str:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=_env())
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{p.stderr[-3000:]}")
    return p.stdout


def steps_for(workload: str, quick: bool) -> int:
    return {"mlp": 150, "lenet": 100, "wide": 30}[workload] // (3 if quick else 1)


def ours(launcher: str, config: str, steps: int, extra_sets=()) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        sets = [f"train.max_steps={steps + 5}", "train.epochs=1000", "data.eval_fraction=0.01", *extra_sets]
        args = [config, "--out", Path(tmp) / "run"] + [a for s in sets for a in ("--set", s)]
        start = time.perf_counter()
        if launcher == "local":
            _run([sys.executable, ROOT / "launchers/local.py", *args])
        elif launcher == "mpi":
            _run([BIN / "mpirun", "-n", 2, "--bind-to", "none", *ROOT_FLAG, sys.executable,
                  ROOT / "launchers/mpi.py", *args])
        else:
            _run([BIN / "spark-submit", "--master", "local[2]", "--conf", "spark.ui.enabled=false",
                  ROOT / "launchers/spark.py", *args, "--set", "spark.workers=2"])
        wall = time.perf_counter() - start
        summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
        return {"sps": summary["steady_samples_per_sec"], "wall": wall}


def ddp(config: str, steps: int) -> dict:
    start = time.perf_counter()
    out = _run([BIN / "torchrun", "--nproc_per_node", 2, "--master_port", 29511,
                ROOT / "scripts/peers/ddp_train.py", config, "--steps", steps])
    return {"sps": json.loads(out.strip().splitlines()[-1])["steady_samples_per_sec"],
            "wall": time.perf_counter() - start}


def torch_distributor(config: str, steps: int) -> dict:
    start = time.perf_counter()
    out = _run([sys.executable, ROOT / "scripts/peers/torch_distributor.py", config, "--steps", steps])
    return {"sps": json.loads(out.strip().splitlines()[-1])["steady_samples_per_sec"],
            "wall": time.perf_counter() - start}


def median_of(fn, reps: int) -> dict:
    runs = [fn() for _ in range(reps)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--workloads", default="mlp,lenet,wide")
    p.add_argument("--markdown", type=Path, help="also write the table here")
    args = p.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    runners = {
        "local": lambda c, s: ours("local", c, s),
        "mpi-2": lambda c, s: ours("mpi", c, s),
        "mpi-2 default threads": lambda c, s: ours("mpi", c, s, ["threads=" + str(os.cpu_count())]),
        "ddp-2": ddp,
        "spark-2": lambda c, s: ours("spark", c, s),
        "tdist-2": torch_distributor,
    }
    rows = []
    for w in args.workloads.split(","):
        config, steps = WORKLOADS[w], steps_for(w, args.quick)
        res = {}
        for name, fn in runners.items():
            res[name] = median_of(lambda: fn(config, steps), reps)
            print(f"  {w:6} {name:22} {res[name]['sps']:10,.0f} samples/s  {res[name]['wall']:6.1f} s wall",
                  file=sys.stderr, flush=True)
        rows.append((w, res))
    names = list(runners)
    head = ["workload", *names, "mpi-2 / ddp-2", "thread budget gain", "spark-2 / mpi-2",
            "spark wall / tdist wall"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for w, r in rows:
        lines.append(f"| {w} | " + " | ".join(f"{r[n]['sps']:,.0f}" for n in names)
                     + f" | {r['mpi-2']['sps'] / r['ddp-2']['sps']:.2f}x"
                     + f" | {r['mpi-2']['sps'] / r['mpi-2 default threads']['sps']:.2f}x"
                     + f" | {r['spark-2']['sps'] / r['mpi-2']['sps']:.2f}x"
                     + f" | {r['spark-2']['wall']:.1f} s / {r['tdist-2']['wall']:.1f} s"
                     + f" = {r['spark-2']['wall'] / r['tdist-2']['wall']:.2f}x |")
    table = "\n".join(lines)
    print(f"steady-state training samples/s, median of {reps} (global batch 128, {os.cpu_count()} cores)\n")
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
