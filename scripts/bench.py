"""Throughput benchmark: dist-train against its peers on the same cores, in one run.

    .venv/bin/python scripts/bench.py                  # 3 repetitions, median; writes docs/bench.md + .png
    .venv/bin/python scripts/bench.py --quick          # 1 repetition, fewer steps, some rows on mlp only (< 3 min)

Workloads: conf/bench_mlp.yaml (784-512-512-10), bench_lenet.yaml, bench_wide.yaml
(784-4096-4096-10, 20 M parameters); global batch 128, synthetic MNIST-shaped data.
Reported: steady-state training samples/s (first 5 steps left out), median over repetitions;
where an MPI step's time goes against local-2x's (ms per step by kind); launch to the first
training step of `dist-train local|mpi -n 2|spark` on conf/digits.yaml (a new user's first run).
Our rows evaluate nothing while they train (train.eval_every: 0), as the peers do not.
Repetitions are interleaved (every row once, then every row again), so a drift in this
machine's speed over minutes shifts all rows alike instead of the ratios between them.

Rows (2 processes get 1 torch thread each, the single process all cores):
  plain-1         the plain single-process PyTorch loop (peers/plain_loop.py)
  local           dist-train local mode
  mpi-2           dist-train, mpirun -n 2
  local-2x        two dist-train local runs at once, 1 thread and half the global batch each: the
                  ceiling that counts (the same engine, nothing exchanged), their summed speed over
                  the window in which both ran (from their metrics lines' wall clock)
  torchrun-2      a user's script on dist_train.fit (peers/user_fit.py), torchrun --nproc-per-node 2
  mpi-2 threads=N the same with every rank on all cores (torch's default): the thread budget's effect
  ddp-2           PyTorch DDP, gloo, torchrun --nproc_per_node 2 (peers/ddp_train.py)
  ref-fused-2     hand-written mpi4py: flatten, one Allreduce, divide, copy back (peers/mpi_ref.py)
  ref-pertensor-2 hand-written mpi4py, one Allreduce per gradient tensor
  nosync-2        two processes that never exchange gradients: the ceiling on these cores
  spark-2         dist-train spark --master local[2], 2 workers (wall time: the whole job, the driver
                  JVM started from its class archive as `dist-train spark` keeps it)
  tdist-2         pyspark's TorchDistributor, 2 tasks on local[2], running the DDP loop
Horovod 0.28.1 does not build against torch 2.13 (C++17 headers vs its C++14 build), so its
numbers are quoted from the issue's table, measured on this machine type elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dist_train.cli import spark_env  # PATH and PYSPARK_* pointing at this environment
from dist_train.launchers.mpi import command as mpirun_command

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WORKLOADS = {"mlp": "conf/bench_mlp.yaml", "lenet": "conf/bench_lenet.yaml", "wide": "conf/bench_wide.yaml"}
STEPS = {"mlp": 600, "lenet": 300, "wide": 30}  # a few seconds of steady state each: ~4, ~10, ~150 ms a step
HOROVOD_QUOTED = {"mlp": 11800, "lenet": 9800, "wide": 470}  # issue 5's table; does not build here
MPIRUN = mpirun_command(2, [])  # the project's one mpirun command line: mpirun -n 2 --bind-to none ...


class Hung(RuntimeError):
    """A run that did not finish within its time limit (recorded, not fatal)."""


MPIRUN_DID_NOT_START = "The PMIx server's listener thread failed to start"  # an Open MPI 5 flake: rerun once


def _run(cmd, timeout=240, result_counts=False, retry=True) -> str:
    """Run a benchmark command in its own process group; past `timeout` kill the group.
    `result_counts`: a peer that printed its result and then crashed while shutting down
    (torch 2.13's gloo sometimes aborts in a thread destructor at exit) still counts."""
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=spark_env(), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise Hung(f"{' '.join(map(str, cmd[:4]))} ... did not finish in {timeout} s") from None
    if proc.returncode != 0 and retry and MPIRUN_DID_NOT_START in err + out:
        return _run(cmd, timeout, result_counts, retry=False)
    if proc.returncode != 0 and result_counts and _has_result(out):
        print(f"  (exit {proc.returncode} after printing its result: {err.strip().splitlines()[-1][:120]})",
              file=sys.stderr, flush=True)
    elif proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{err[-3000:]}{out[-2000:]}")
    return out


def _has_result(out: str) -> bool:
    try:
        return "steady_samples_per_sec" in _last_json(out)
    except (ValueError, IndexError):
        return False


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def ours(launcher: str, config: str, steps: int, extra_sets=()) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        sets = [f"train.max_steps={steps + 5}", "train.epochs=1000", "data.eval_fraction=0.01", "train.eval_every=0",
                *extra_sets]
        args = [config, "--out", Path(tmp) / "run"] + [a for s in sets for a in ("--set", s)]
        start = time.perf_counter()
        if launcher == "local":
            _run([sys.executable, ROOT / "launchers/local.py", *args])
        elif launcher == "torchrun":
            _run([BIN / "torchrun", "--nproc-per-node", 2, "--master-port", 29512, ROOT / "scripts/peers/user_fit.py",
                  config, Path(tmp) / "run", *sets])
        elif launcher == "mpi":
            _run([*MPIRUN, sys.executable, ROOT / "launchers/mpi.py", *args])
        else:
            _run([BIN / "dist-train", "spark", "--master", "local[2]", "--spark-arg=--conf",  # as a user starts it
                  "--spark-arg=spark.ui.enabled=false", *args, "--set", "spark.workers=2"])
        wall = time.perf_counter() - start
        s = json.loads((Path(tmp) / "run" / "summary.json").read_text())
        sec, timed = s["seconds_mean_over_workers"], max(s["steps_run"] - 1, 1)  # mean over workers
        return {"sps": s["steady_samples_per_sec"], "wall": wall, "data_pct": 100 * sec["data"] / sum(sec.values()),
                "rss_mb": s["peak_rss_mb"], "grad_bytes": s["grad_bytes"],
                **{f"{k}_ms": 1000 * v / timed for k, v in sec.items()}}  # comm_ms, wait_ms, ... (TIMES)


def local_pair(config: str, steps: int) -> dict:
    """Two local runs started together, 1 thread and half the global batch each: their
    summed samples/s over the window in which both ran (metrics lines every tenth of the steps,
    on one wall clock), and their mean ms per step by kind."""
    every = max(steps // 10, 1)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**spark_env(), "DIST_TRAIN_STARTED": repr(time.time())}  # one wall clock for both
        sets = [f"train.max_steps={steps + 5}", "train.epochs=1000", "data.eval_fraction=0.01", "train.eval_every=0",
                "threads=1", "train.batch_size=64", f"train.log_every={every}"]
        start = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, ROOT / "launchers/local.py", config, "--out", Path(tmp) / f"r{i}",
                                   *[a for s in sets for a in ("--set", s)]], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env) for i in range(2)]
        for p in procs:
            if p.wait(timeout=240) != 0:
                raise RuntimeError(f"local-2x: a run failed:\n{p.stderr.read()[-2000:]}")
        wall = time.perf_counter() - start
        lines = [[r for r in map(json.loads, (Path(tmp) / f"r{i}" / "metrics.jsonl").read_text().splitlines())
                  if r["kind"] == "step"] for i in range(2)]
        lo, hi = max(rows[0]["wall"] for rows in lines), min(rows[-1]["wall"] for rows in lines)
        sps = 0.0
        for rows in lines:
            inside = [r for r in rows if lo <= r["wall"] <= hi]
            if len(inside) < 2:
                raise RuntimeError("local-2x: the two runs did not overlap for two metrics lines")
            sps += (inside[-1]["samples"] - inside[0]["samples"]) / (inside[-1]["wall"] - inside[0]["wall"])
        summaries = [json.loads((Path(tmp) / f"r{i}" / "summary.json").read_text()) for i in range(2)]
        kinds = {k: statistics.mean(1000 * s["seconds"][k] / s["steps_run"] for s in summaries)
                 for k in summaries[0]["seconds"]}
        return {"sps": sps, "wall": wall, "rss_mb": max(s["peak_rss_mb"] for s in summaries),
                **{f"{k}_ms": v for k, v in kinds.items()}}


def peer(cmd: list, timeout: int = 240) -> dict:
    start = time.perf_counter()
    out = _last_json(_run(cmd, timeout=timeout, result_counts=True))
    return {"sps": out["steady_samples_per_sec"], "wall": time.perf_counter() - start,
            "rss_mb": out.get("peak_rss_mb", float("nan"))}


def runners(quick: bool, workload: str) -> dict:
    cores = os.cpu_count() or 1
    r = {
        "plain-1": lambda c, s: peer([sys.executable, ROOT / "scripts/peers/plain_loop.py", c, "--steps", s]),
        "local": lambda c, s: ours("local", c, s),
        "mpi-2": lambda c, s: ours("mpi", c, s),
        "local-2x": local_pair,
        "torchrun-2": lambda c, s: ours("torchrun", c, s),
        "ddp-2": lambda c, s: peer([BIN / "torchrun", "--nproc_per_node", 2, "--master_port", 29511,
                                    ROOT / "scripts/peers/ddp_train.py", c, "--steps", s]),
        "ref-fused-2": lambda c, s: peer([*MPIRUN, sys.executable, ROOT / "scripts/peers/mpi_ref.py", c,
                                          "--mode", "fused", "--steps", s]),
        "nosync-2": lambda c, s: peer([*MPIRUN, sys.executable, ROOT / "scripts/peers/mpi_ref.py", c,
                                       "--mode", "nosync", "--steps", s]),
    }
    if not quick or workload == "mlp":  # --quick: these rows on the MLP only (under 3 minutes in all)
        # oversubscribed threads are slow: a few steps show it
        r[f"mpi-2 threads={cores}"] = lambda c, s: ours("mpi", c, min(s, 20), [f"threads={cores}"])
        r["ref-pertensor-2"] = lambda c, s: peer([*MPIRUN, sys.executable, ROOT / "scripts/peers/mpi_ref.py", c,
                                                  "--mode", "per_tensor", "--steps", s])
        r["spark-2"] = lambda c, s: ours("spark", c, s)
        # it hangs in about one run of three here (its wall time is ~25-30 s otherwise)
        r["tdist-2"] = lambda c, s: peer([sys.executable, ROOT / "scripts/peers/torch_distributor.py", c,
                                          "--steps", s], timeout=120)
    return r


def bare_allreduce_ms(config: str, steps: int) -> tuple[float, float]:
    """A bare MPI Allreduce of the model's gradient bytes (ms): called in a loop, its buffer
    left in cache; and called between training steps of the fused loop, as our exchange
    is, with the step's data just written by backward (peers/mpi_ref.py --mode bare)."""
    out = _last_json(_run([*MPIRUN, sys.executable, ROOT / "scripts/peers/mpi_ref.py", config, "--mode", "bare",
                           "--steps", steps]))
    return out["loop_ms"], out["step_ms"]


STARTUP = {"local": ["local"], "mpi -n 2": ["mpi", "-n", "2"], "spark local[2]": ["spark", "--master", "local[2]"],
           "spark, no class archive": ["spark", "--master", "local[2]"]}  # its lever's gain, measured each run
STARTUP_ENV = {"spark, no class archive": {"DIST_TRAIN_CLASS_ARCHIVE": "0"}}


def startup(reps: int) -> dict:
    """Seconds from launching `dist-train local|mpi|spark` on conf/digits.yaml to the end of
    its first training step (its first metrics line's wall clock, which counts from the
    launch given as DIST_TRAIN_STARTED), and to its exit; medians of `reps`."""
    found = {}
    for name, cmd in STARTUP.items():
        firsts, exits = [], []
        for _ in range(reps):
            with tempfile.TemporaryDirectory() as tmp:
                launched = time.time()
                env = {**spark_env(), "DIST_TRAIN_STARTED": repr(launched), **STARTUP_ENV.get(name, {})}
                p = subprocess.run([BIN / "dist-train", *cmd, "conf/digits.yaml", "--out", Path(tmp) / "run",
                                    "--set", "train.log_every=1", "--set", "train.max_steps=3"],
                                   capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
                if p.returncode != 0:
                    raise RuntimeError(f"dist-train {name} failed:\n{p.stderr[-2000:]}")
                exits.append(time.time() - launched)
                first = json.loads((Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()[0])
                firsts.append(first["wall"])
        found[name] = (statistics.median(firsts), statistics.median(exits))
        print(f"  start-up {name:16} first step {found[name][0]:5.2f} s, exit {found[name][1]:5.2f} s",
              file=sys.stderr, flush=True)
    return found


def interleaved(fns: dict, reps: int) -> dict:
    """Every row once per repetition, in turn; name -> (results, hung count)."""
    runs = {name: ([], 0) for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            done, hung = runs[name]
            try:
                done.append(fn())
                print(f"    {name}: {done[-1]['sps']:,.0f} samples/s", file=sys.stderr, flush=True)
            except Hung as e:
                print(f"  HUNG: {e}", file=sys.stderr, flush=True)
                runs[name] = (done, hung + 1)
    return runs


def median_of(runs: list, hung: int) -> dict:
    if not runs:
        return {"sps": float("nan"), "wall": float("nan"), "comm_ms": float("nan"), "wait_ms": float("nan"),
                "data_pct": float("nan"), "rss_mb": float("nan"), "grad_bytes": float("nan"), "hung": hung}
    return {**{k: statistics.median(r[k] for r in runs) for k in runs[0]}, "hung": hung}


def table(rows, reps: int) -> str:
    names = []
    for _, res, _ in rows:
        names += [n for n in res if n not in names]
    head = ["workload", *names, "horovod-2 (quoted)"]
    lines = [f"Steady-state training samples/s, median of {reps}, {os.cpu_count()} cores, global batch 128.", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for w, res, _ in rows:
        lines.append(f"| {w} | " + " | ".join(_cell(res.get(n)) for n in names)
                     + f" | {HOROVOD_QUOTED[w]:,} |")
    lines += ["", "| workload | local / plain-1 | mpi-2 / ddp-2 | mpi-2 / nosync-2 | mpi-2 / ref-fused-2 | "
              "exchange ms per step (mpi-2) | bare Allreduce ms, in a loop | bare Allreduce ms, between "
              "training steps | exchange / bare (between steps) | waiting for the other rank, "
              "ms per step (mpi-2) | thread budget gain | spark-2 / mpi-2 | spark-2 wall / tdist-2 wall | "
              "data wait (mpi-2, % of step) | peak RSS per rank, MB: mpi-2 / nosync-2 (limit: nosync-2 + "
              "parameters + gradients) |",
              "|---" * 15 + "|"]
    for w, r, bare in rows:
        threads = next((n for n in r if n.startswith("mpi-2 threads")), None)
        gain = f"{r['mpi-2']['sps'] / r[threads]['sps']:.2f}x" if threads else "-"
        spark = (f"{r['spark-2']['sps'] / r['mpi-2']['sps']:.2f}x | {r['spark-2']['wall']:.1f} s / "
                 f"{r['tdist-2']['wall']:.1f} s = {r['spark-2']['wall'] / r['tdist-2']['wall']:.2f}x"
                 if "spark-2" in r else "- | -")
        lines.append(
            f"| {w} | {r['local']['sps'] / r['plain-1']['sps']:.2f}x | {r['mpi-2']['sps'] / r['ddp-2']['sps']:.2f}x"
            f" | {r['mpi-2']['sps'] / r['nosync-2']['sps']:.2f}x | {r['mpi-2']['sps'] / r['ref-fused-2']['sps']:.2f}x"
            f" | {r['mpi-2']['comm_ms']:.2f} | {bare[0]:.2f} | {bare[1]:.2f} | {r['mpi-2']['comm_ms'] / bare[1]:.2f}x"
            f" | {r['mpi-2']['wait_ms']:.2f}"
            f" | {gain} | {spark}"
            f" | {r['mpi-2']['data_pct']:.1f}% | {_memory(r['mpi-2'], r['nosync-2'])} |")
    return "\n".join(lines)


KINDS = ("data", "compute", "optimizer", "comm", "wait", "other")
TARGETS = "mpi-2 / local-2x >= 0.97, torchrun-2 / mpi-2 >= 0.95, spark-2 / mpi-2 >= 0.97, mpi-2 / ddp-2 >= 2.5"


def targets(rows, launch: dict | None) -> str:
    """Issue 20's ratios, and where an MPI-2 step's time goes against a local-2x run's."""
    lines = [f"Targets ({TARGETS}):", "", "| workload | mpi-2 / local-2x | torchrun-2 / mpi-2 | spark-2 / mpi-2 | "
             "mpi-2 / ddp-2 | ms per step, mpi-2 (" + ", ".join(KINDS) + ") | ms per step, local-2x |", "|---" * 7 + "|"]
    for w, r, _ in rows:
        def ratio(a, b):
            return f"{r[a]['sps'] / r[b]['sps']:.2f}x" if a in r and b in r else "-"

        def ms(row):
            return " / ".join(f"{r[row].get(f'{k}_ms', float('nan')):.2f}" for k in KINDS)

        lines.append(f"| {w} | {ratio('mpi-2', 'local-2x')} | {ratio('torchrun-2', 'mpi-2')} | "
                     f"{ratio('spark-2', 'mpi-2')} | {ratio('mpi-2', 'ddp-2')} | {ms('mpi-2')} | {ms('local-2x')} |")
    if launch:
        lines += ["", "Launch to the end of the first training step, conf/digits.yaml (targets: local <= 2 s, "
                  "mpi -n 2 <= 4 s, spark local[2] <= 10 s):", "", "| | " + " | ".join(launch) + " |",
                  "|---" * (len(launch) + 1) + "|",
                  "| first step, s | " + " | ".join(f"{v[0]:.2f}" for v in launch.values()) + " |",
                  "| exit, s | " + " | ".join(f"{v[1]:.2f}" for v in launch.values()) + " |"]
    return "\n".join(lines)


def _memory(ours: dict, ceiling: dict) -> str:
    """Issue 5's memory rule: no more than one extra copy of the parameters plus gradients
    beyond what PyTorch itself holds (the no-sync peer: the same model, SGD and batches)."""
    limit = ceiling["rss_mb"] + 2 * ours["grad_bytes"] / 2**20
    verdict = "met" if ours["rss_mb"] <= limit else "NOT met"
    return f"{ours['rss_mb']:,.0f} / {ceiling['rss_mb']:,.0f} (<= {limit:,.0f}: {verdict})"


def _cell(r) -> str:
    if r is None:
        return "-"
    if r["sps"] != r["sps"]:
        return "hung"
    return f"{r['sps']:,.0f}" + (f" ({r['hung']} hung)" if r.get("hung") else "")


def chart(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 4.5))
    for ax, (w, res, _) in zip(axes if len(rows) > 1 else [axes], rows):
        names = list(res) + ["horovod-2 (quoted)"]
        values = [res[n]["sps"] for n in res] + [HOROVOD_QUOTED[w]]
        colors = ["tab:blue" if n in ("local", "mpi-2", "spark-2") else "tab:gray" for n in names]
        ax.barh(names[::-1], values[::-1], color=colors[::-1])
        ax.set_title(f"{w}: samples/s (blue: dist-train)")
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--workloads", default="mlp,lenet,wide")
    p.add_argument("--no-startup", action="store_true", help="leave out the start-up table (~1 min a repetition)")
    p.add_argument("--out", type=Path, default=None,
                   help="write OUT.md, OUT.json and OUT.png (default docs/bench[-quick])")
    args = p.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    rows = []
    for w in args.workloads.split(","):
        config, steps = WORKLOADS[w], STEPS[w] // (5 if args.quick else 1)
        fns = {name: (lambda fn=fn: fn(config, steps)) for name, fn in runners(args.quick, w).items()}
        res = {name: median_of(*runs) for name, runs in interleaved(fns, reps).items()}
        for name, r in res.items():
            print(f"  {w:6} {name:18} {r['sps']:10,.0f} samples/s  {r['wall']:6.1f} s wall",
                  file=sys.stderr, flush=True)
        rows.append((w, res, bare_allreduce_ms(config, steps)))
    launch = None if args.no_startup else startup(reps)
    text = table(rows, reps) + "\n\n" + targets(rows, launch)
    print(text)
    out = args.out or ROOT / "docs" / ("bench-quick" if args.quick else "bench")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(  # the medians, for scripts/cost_model.py
        {"reps": reps, "quick": args.quick, "workloads": {
            w: {"rows": res, "bare_allreduce_ms": {"loop": bare[0], "between_steps": bare[1]}}
            for w, res, bare in rows}, "startup_s": launch}, indent=1) + "\n")
    try:
        chart(rows, out.with_suffix(".png"))
    except ImportError:
        print("(matplotlib not installed: no chart)", file=sys.stderr)


if __name__ == "__main__":
    main()
