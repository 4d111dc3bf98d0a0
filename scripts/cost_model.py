"""Ring-allreduce cost model: predicted data-parallel scaling of the benchmark workloads.

    .venv/bin/python scripts/cost_model.py [--bandwidth-gbs 10] [--latency-us 10]

Per step, a worker computes its local batch (time c, measured on one core of this machine
by the no-sync row of scripts/bench.py) and then takes part in one ring allreduce of the
S gradient bytes over p workers:

    T_allreduce(p) = 2 (p - 1) / p * S / B  +  2 (p - 1) * alpha

(reduce-scatter then allgather, each p - 1 hops; B the per-link bandwidth, alpha the
per-hop latency). Without overlap, step time = c + T_allreduce, and weak-scaling
efficiency (local batch fixed at 64) = c / (c + T_allreduce). The 2-rank check uses the
measured exchange time of dist-train's 2 ranks (shared memory, one host) instead of the
network model.
"""

import argparse

# per-worker compute for a local batch of 64 on one core (no-sync row), gradient bytes, dist-train's measured
# exchange time per step and 2-rank samples/s: docs/bench.md (scripts/bench.py, median of 3, this machine)
WORKLOADS = {
    "mlp": {"c_ms": 64 / (37384 / 2) * 1000, "bytes": 2_678_824, "exchange2_ms": 0.19, "mpi2_sps": 34504},
    "lenet": {"c_ms": 64 / (12844 / 2) * 1000, "bytes": 431_144, "exchange2_ms": 0.16, "mpi2_sps": 13857},
    "wide": {"c_ms": 64 / (905 / 2) * 1000, "bytes": 80_150_568, "exchange2_ms": 7.86, "mpi2_sps": 1047},
}


def allreduce_ms(p: int, nbytes: float, gbs: float, latency_us: float) -> float:
    return (2 * (p - 1) / p * nbytes / (gbs * 1e9) + 2 * (p - 1) * latency_us * 1e-6) * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bandwidth-gbs", type=float, default=10.0)
    ap.add_argument("--latency-us", type=float, default=10.0)
    a = ap.parse_args()
    print(f"Ring allreduce, {a.bandwidth_gbs:g} GB/s per link, {a.latency_us:g} us per hop, local batch 64, no overlap\n")
    print("| workload | compute ms | MB | 2 ranks: predicted / measured samples/s | "
          + " | ".join(f"p={p}: allreduce ms, efficiency, samples/s" for p in (8, 64, 512)) + " |")
    print("|---" * 7 + "|")
    for w, m in WORKLOADS.items():
        c, S = m["c_ms"], m["bytes"]
        pred2 = 2 * 64 / (c + m["exchange2_ms"]) * 1000
        cells = []
        for p in (8, 64, 512):
            t = allreduce_ms(p, S, a.bandwidth_gbs, a.latency_us)
            eff = c / (c + t)
            cells.append(f"{t:.2f}, {eff:.0%}, {p * 64 / (c + t) * 1000:,.0f}")
        print(f"| {w} | {c:.1f} | {S / 1e6:.1f} | {pred2:,.0f} / {m['mpi2_sps']:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
