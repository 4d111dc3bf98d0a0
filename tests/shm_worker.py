"""Worker body for test_shm.py (a module of its own so spawned processes can import it)."""

import os
import sys
import time


def run(rank, world, port, hosts, token, mode, queue):
    import torch

    from dist_train import comm as comms
    from dist_train.comm import shm, torchdist
    from tests.helpers import in_shared_memory

    try:
        inner = torchdist.connect("127.0.0.1", port, rank, world, timeout_s=30)
        comm = shm.share(inner, torchdist.split, hosts=hosts, timeout_s=3.0, slot_bytes=4096,  # chunked
                         token=token)
        out = {}
        for dtype in (torch.float32, torch.float64):
            buf = torch.arange(5000, dtype=dtype) * (rank + 1)
            comm.allreduce(buf)
            out[str(dtype)] = buf.tolist()[:3] + [buf.sum().item()]
        shm.SharedGrads.PIECE = 1000  # several pieces per part
        grads = comms.buffer(comm, 5006, torch.float32, torch.device("cpu"))
        out["grads in shared memory"] = in_shared_memory(grads)
        for step in range(3):  # the sum, then the mean by the summed count
            grads.zero_()
            grads[:5000] = torch.arange(5000, dtype=torch.float32) * (rank + 1) * (step + 1)
            grads[5000] = 2.0 * (rank + 1)  # this worker's sample count
            comm.allreduce(grads)
            grads[:5000] /= grads[5000]
            out[f"grads {step}"] = grads[:3].tolist() + [grads[:5000].sum().item(), grads[5000].item()]
        # fractions, whose sum depends on its order: every worker's part is summed in slot order
        values = [torch.randn(5000, generator=torch.Generator().manual_seed(r)) for r in range(world)]
        grads.zero_()
        grads[:5000] = values[rank]
        comm.allreduce(grads)
        expected = values[0].clone()
        for v in values[1:]:
            expected += v
        out["fractions in slot order"] = torch.equal(grads[:5000], expected)
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
