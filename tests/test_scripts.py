"""The scripts beside the benchmark: the cost model reads what scripts/bench.py wrote; the GPU check's dry run;
the cross-host exchange under mpirun."""

import json
import sys

import pytest

from .helpers import ROOT, ok, run

ROW = {"sps": 1.0, "comm_ms": 0.0, "grad_bytes": 0}


def test_the_cost_model_predicts_from_the_bench_results(tmp_path):
    """10 ms of compute a local batch of 64 (no-sync: 2 x 6,400 samples/s), 10 MB of gradients,
    1 ms exchange: a ring of 8 at 10 GB/s and 10 us a hop takes 2 x 7/8 x 1 ms + 14 x 10 us."""
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"workloads": {"toy": {"rows": {
        "nosync-2": {**ROW, "sps": 12800.0},
        "mpi-2": {**ROW, "sps": 11000.0, "comm_ms": 1.0, "grad_bytes": 10_000_000}}}}}))
    p = ok(run([sys.executable, ROOT / "scripts/cost_model.py", "--bench", bench], timeout=60))
    row = next(line for line in p.stdout.splitlines() if line.startswith("| toy |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["10.0", "10.0", "11,636 / 11,000"]  # 2 x 64 / 11 ms
    assert cells[4] == "1.89, 84%, 43,061"  # 1.75 + 0.14 ms; 10 / 11.89; 8 x 64 / 11.89 ms


def test_the_cost_model_without_bench_results_says_so(tmp_path):
    p = run([sys.executable, ROOT / "scripts/cost_model.py", "--bench", tmp_path / "none.json"], timeout=60)
    assert p.returncode == 1 and "run scripts/bench.py first" in p.stderr and p.stderr.count("\n") == 1


@pytest.mark.slow
def test_the_gpu_check_dry_run_prints_every_row(tmp_path):
    """scripts/gpu_check.py --cpu: the GPU check's code on the CPU (the GPU verdicts need a GPU)."""
    proc = run([sys.executable, ROOT / "scripts/gpu_check.py", "--cpu"], timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("| row | result | verdict |"):]
    for name in ("cuda-vs-cpu", "mpi-2-shared", "nccl-1", "spark-2", "fp16", "bf16", "lenet", "resnet", "h2d"):
        assert f"| {name} |" in table, name
    assert "FAIL" not in table


@pytest.mark.slow
@pytest.mark.mpi
def test_the_cross_host_bench_runs_both_legs_under_mpirun_and_models_the_scale(tmp_path):
    """scripts/bench_hosts.py: 4 ranks posed as 2 hosts really sum a 1 MB buffer through the
    shared-memory and MPI legs; the 8-worker prediction is its measured host leg plus a ring
    of 4 hosts over half the bytes at 10 GB/s, 10 us a hop: 2 x 3/4 x 0.5 MB + 6 x 10 us."""
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"workloads": {"toy": {"rows": {
        "nosync-2": {**ROW, "sps": 12800.0}, "mpi-2": {**ROW, "sps": 11000.0, "grad_bytes": 1_000_000}}}}}))
    p = ok(run([sys.executable, ROOT / "scripts/bench_hosts.py", "--bench", bench, "--reps", "3"], timeout=180))
    rows = [line for line in p.stdout.splitlines() if line.startswith("| toy |")]
    assert len(rows) == 2, p.stdout
    measured = [c.strip() for c in rows[0].strip("|").split("|")]
    full, host, cross = (float(c) for c in measured[2:5])
    assert measured[1] == "1.0" and full > 0 and host > 0 and cross > 0
    p8 = float(rows[1].strip("|").split("|")[2].split(",")[0])
    assert abs(p8 - (host + 0.075 + 0.06)) <= 0.011, (p8, host)
    assert "4 ranks posed as 2 hosts of 2" in p.stdout
