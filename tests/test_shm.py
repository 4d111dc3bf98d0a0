"""Shared-memory allreduce among processes of one host (shm.HostShm over torch.distributed),
with gloo between 'hosts'."""

import multiprocessing as mp
import socket
import uuid

import pytest

from dist_train.comm import shm

from . import shm_worker

pytestmark = pytest.mark.skipif(not shm.supported(), reason="shared-memory allreduce needs x86-64 Linux")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(hosts, mode="ok", expect=None, token=None):
    ctx = mp.get_context("spawn")
    queue, world, port, token = ctx.Queue(), len(hosts), free_port(), token or uuid.uuid4().hex
    procs = [ctx.Process(target=shm_worker.run, args=(r, world, port, hosts, token, mode, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(expect or world):
        rank, out = queue.get(timeout=90)
        results[rank] = out
    for p in procs:
        p.join(timeout=60)
    return results


HOSTS = {"one-host": ["h", "h", "h"], "two-hosts": ["a", "a", "b"], "two-by-two": ["a", "b", "a", "b"]}


@pytest.mark.parametrize("hosts", HOSTS.values(), ids=HOSTS.keys())
def test_allreduce_sums_exactly_in_both_dtypes(hosts):
    results = launch(hosts)
    n, s = 5000, sum(range(1, len(hosts) + 1))  # worker r adds (r + 1) * i
    for rank, out in results.items():
        assert "error" not in out, out
        for dtype in ("torch.float32", "torch.float64"):
            first, second, third, total = out[dtype]
            assert [first, second, third] == [0.0, s, 2 * s]
            assert total == pytest.approx(s * n * (n - 1) / 2)
        assert out["after"] == "ok"
        # the gradient buffer: in shared memory where a host has several workers, the same sum everywhere
        assert out["grads in shared memory"] == (hosts.count(hosts[rank]) > 1)
        for step in range(3):  # sum over workers of (r + 1)(step + 1) i, divided by the count 2 s
            first, second, third, total, count = out[f"grads {step}"]
            assert [first, second, third, count] == [0.0, (step + 1) / 2, (step + 1), 2 * s]
            assert total == pytest.approx((step + 1) * n * (n - 1) / 4)
        if len(set(hosts)) == 1:  # across hosts gloo picks the order
            assert out["fractions in slot order"], "(g0 + g1) + g2, bit for bit, on every worker"
    assert not list(shm.SHM_DIR.glob("dist-train-*")), "segments are unlinked once mapped"


def test_a_dead_peer_is_named_within_seconds():
    results = launch(["h", "h", "h"], mode="die", expect=2)
    for rank in (0, 1):
        assert "rank 2" in results[rank]["after"] and "exited" in results[rank]["after"]
        assert results[rank]["seconds"] < 5


def test_a_stalled_peer_is_named_after_the_timeout():
    results = launch(["h", "h", "h"], mode="stall", expect=2)
    for rank in (0, 2):
        assert "rank 1 did not arrive within 3 s (stalled)" in results[rank]["after"]
        assert 3 <= results[rank]["seconds"] < 8


def test_when_one_host_cannot_map_its_segment_every_worker_falls_back_together():
    """Host b's segment cannot be created (the name is taken, as a full /dev/shm would fail
    it): no worker keeps a shared buffer, the sums are still right, nothing is left over."""
    token = uuid.uuid4().hex
    taken = shm.SHM_DIR / f"dist-train-{token}-1-grads"  # host b's leader is rank 1
    taken.write_bytes(b"")
    try:
        results = launch(["a", "b", "a", "b"], token=token)
    finally:
        taken.unlink()
    s = 10
    for rank, out in results.items():
        assert "error" not in out, out
        assert out["grads in shared memory"] is False
        for step in range(3):
            first, second, third, total, count = out[f"grads {step}"]
            assert [first, second, third, count] == [0.0, (step + 1) / 2, (step + 1), 2 * s]
    assert not list(shm.SHM_DIR.glob(f"dist-train-{token}-*")), "host a's segment is removed too"
