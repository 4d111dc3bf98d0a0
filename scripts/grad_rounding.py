"""Accuracy cost of half-precision gradients, as a compressed exchange would round them.

Trains each config in local mode three times (seeds 0-2) with the step's averaged
gradient as it is, rounded to bf16, and rounded to fp16 before every optimizer step,
and prints the held-out accuracies (docs/performance.md, "tried and not kept"):

    .venv/bin/python scripts/grad_rounding.py conf/digits.yaml conf/digits_cnn.yaml
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dist_train import config, data  # noqa: E402
from dist_train.comm import LocalComm  # noqa: E402
from dist_train.train import fit  # noqa: E402

ROUND_TO = None  # the dtype gradients are rounded through, or None
_sgd_step, _adam_step = torch.optim.SGD.step, torch.optim.Adam.step


def _rounding(step):
    def rounded_step(self, *args, **kwargs):
        if ROUND_TO is not None:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.copy_(p.grad.to(ROUND_TO).to(p.grad.dtype))
        return step(self, *args, **kwargs)
    return rounded_step


def main(configs: list[str]) -> None:
    global ROUND_TO
    torch.optim.SGD.step, torch.optim.Adam.step = _rounding(_sgd_step), _rounding(_adam_step)
    for path in configs:
        for dtype in (None, torch.bfloat16, torch.float16):
            ROUND_TO, accuracies = dtype, []
            for seed in (0, 1, 2):
                cfg = config.load(path, [f"seed={seed}"])
                ds = data.load(cfg)
                result = fit(cfg, LocalComm(), data.WorkerData.whole(ds, ds.classes), quiet=True)
                accuracies.append(result.summary["eval"]["accuracy"])
            print(f"{path}  gradients {str(dtype or 'float32').replace('torch.', ''):9}  held-out accuracy "
                  f"{' '.join(f'{a:.4f}' for a in accuracies)}  mean {statistics.mean(accuracies):.4f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["conf/digits.yaml", "conf/digits_cnn.yaml"])
