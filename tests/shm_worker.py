"""Worker body for test_shm.py (a module of its own so spawned processes can import it)."""

import os
import sys
import time
from datetime import timedelta


def run(rank, world, port, hosts, token, mode, queue):
    import torch
    import torch.distributed as dist

    from dist_train import shm
    from dist_train.comm import HostLocalComm

    try:
        store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timedelta(seconds=30))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=30))
        comm = HostLocalComm(hosts, token, timeout_s=3.0, slot_bytes=4096)  # small slots: chunking is exercised
        out = {}
        for dtype in (torch.float32, torch.float64):
            buf = torch.arange(5000, dtype=dtype) * (rank + 1)
            comm.allreduce(buf)
            out[str(dtype)] = buf.tolist()[:3] + [buf.sum().item()]
        shm.SharedGrads.PIECE = 1000  # several pieces per part
        grads = comm.grad_buffer(5006, torch.float32, torch.device("cpu"))
        out["grads in shared memory"] = comm.shared is not None
        for step in range(3):  # the sum then the mean by the summed count, in one pass (one host) or not
            grads.zero_()
            grads[:5000] = torch.arange(5000, dtype=torch.float32) * (rank + 1) * (step + 1)
            grads[5000] = 2.0 * (rank + 1)  # this worker's sample count
            comm.allreduce_mean(grads, 5000)
            out[f"grads {step}"] = grads[:3].tolist() + [grads[:5000].sum().item(), grads[5000].item()]
        # fractions, whose sum depends on its order: every worker's part is summed in slot order
        values = [torch.randn(5000, generator=torch.Generator().manual_seed(r)) for r in range(world)]
        grads.zero_()
        grads[:5000], grads[5000] = values[rank], 1.0
        idled, late = [], rank == world - 1
        beside_late = hosts[rank] == hosts[world - 1] and not late

        def idle():  # the idle work of the late worker's host peers outlasts its delay (the others' is short,
            idled.append(rank)  # so the sum across hosts does not wait for it)
            time.sleep(0.6 if beside_late else 0.1 if late else 0.0)

        if late:  # the last worker arrives late: the others on its host do their idle work
            time.sleep(0.3)
        waited = comm.waited_s()
        comm.allreduce_mean(grads, 5000, idle=idle)
        out["idle work done"], out["waited"] = bool(idled), comm.waited_s() - waited
        expected = values[0].clone()
        for v in values[1:]:
            expected += v
        out["fractions in slot order"] = torch.equal(grads[:5000], expected / world)
        if mode == "die" and rank == 2:
            os._exit(3)
        if mode == "stall" and rank == 1:
            time.sleep(6)
        start = time.monotonic()
        try:
            comm.allreduce(torch.ones(10))
            out["after"] = "ok"
        except Exception as e:  # noqa: BLE001
            out["after"] = f"{type(e).__name__}: {e}"
        out["seconds"] = time.monotonic() - start
        queue.put((rank, out))
    except BaseException as e:  # noqa: BLE001
        queue.put((rank, {"error": repr(e)}))
        sys.exit(1)
