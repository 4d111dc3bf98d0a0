"""Ring-allreduce cost model: predicted data-parallel scaling of the benchmark workloads.

    .venv/bin/python scripts/cost_model.py [--bench docs/bench.json] [--bandwidth-gbs 10] [--latency-us 10]

Its inputs come from the medians scripts/bench.py wrote (docs/bench.json): per step, a
worker computes its local batch (time c, measured on one core of this machine by the
no-sync row) and then takes part in one ring allreduce of the
S gradient bytes over p workers:

    T_allreduce(p) = 2 (p - 1) / p * S / B  +  2 (p - 1) * alpha

(reduce-scatter then allgather, each p - 1 hops; B the per-link bandwidth, alpha the
per-hop latency). Without overlap, step time = c + T_allreduce, and weak-scaling
efficiency (local batch fixed at 64) = c / (c + T_allreduce). The 2-rank check uses the
measured exchange time of dist-train's 2 ranks (shared memory, one host) instead of the
network model.
"""

import argparse
import json
import sys
from pathlib import Path

LOCAL = 64  # the bench's local batch: global 128 over 2 ranks


def workloads(bench: Path) -> dict:
    """Per workload from a bench run: compute ms per local batch on one core (no-sync row),
    gradient bytes, dist-train's exchange ms per step and samples/s with 2 ranks."""
    try:
        runs = json.loads(bench.read_text())["workloads"]
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"error: {bench}: no benchmark results ({e}); run scripts/bench.py first")
    return {w: {"c_ms": LOCAL / (r["rows"]["nosync-2"]["sps"] / 2) * 1000, "bytes": r["rows"]["mpi-2"]["grad_bytes"],
                "exchange2_ms": r["rows"]["mpi-2"]["comm_ms"], "mpi2_sps": r["rows"]["mpi-2"]["sps"]}
            for w, r in runs.items()}


def allreduce_ms(p: int, nbytes: float, gbs: float, latency_us: float) -> float:
    return (2 * (p - 1) / p * nbytes / (gbs * 1e9) + 2 * (p - 1) * latency_us * 1e-6) * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bandwidth-gbs", type=float, default=10.0)
    ap.add_argument("--latency-us", type=float, default=10.0)
    ap.add_argument("--bench", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "bench.json",
                    help="the results scripts/bench.py wrote (default: docs/bench.json)")
    a = ap.parse_args()
    measured = workloads(a.bench)
    print(f"Ring allreduce, {a.bandwidth_gbs:g} GB/s per link, {a.latency_us:g} us per hop, local batch {LOCAL}, "
          f"no overlap; measured inputs from {a.bench.name}\n")
    print("| workload | compute ms | MB | 2 ranks: predicted / measured samples/s | "
          + " | ".join(f"p={p}: allreduce ms, efficiency, samples/s" for p in (8, 64, 512)) + " |")
    print("|---" * 7 + "|")
    for w, m in measured.items():
        c, S = m["c_ms"], m["bytes"]
        pred2 = 2 * LOCAL / (c + m["exchange2_ms"]) * 1000
        cells = []
        for p in (8, 64, 512):
            t = allreduce_ms(p, S, a.bandwidth_gbs, a.latency_us)
            eff = c / (c + t)
            cells.append(f"{t:.2f}, {eff:.0%}, {p * LOCAL / (c + t) * 1000:,.0f}")
        print(f"| {w} | {c:.1f} | {S / 1e6:.1f} | {pred2:,.0f} / {m['mpi2_sps']:,.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
