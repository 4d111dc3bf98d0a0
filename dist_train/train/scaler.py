"""fp16's loss scale, one decision for every worker.

Backward starts from (loss scale / the step's global count), so fp16 activations' small
gradients do not flush to zero. The scale is a power of two: multiplying by it and by its
inverse is exact, so the unscaled gradients are fp32's to the bit where nothing
overflowed. The check runs on the *summed* gradients, which every worker holds alike
after the allreduce: an overflow anywhere is an Inf or NaN everywhere, and every worker
skips the same step and halves its scale, with no collective of its own (GradScaler's
rule: halve on an overflow, double after `growth_every` good steps).
"""

from __future__ import annotations

import torch


class LossScale:
    def __init__(self, initial: float, growth_every: int):
        self.scale, self.growth_every, self.good, self.overflows = float(initial), growth_every, 0, 0
        self._found = self._inv = None

    def unscale(self, grads: list[torch.Tensor]) -> bool:
        """Divide the summed gradients by the scale, in place; True if any was not finite."""
        device = grads[0].device
        if self._found is None or self._found.device != device:
            self._found = torch.zeros(1, device=device)
            self._inv = torch.zeros((), device=device)
        self._found.zero_()
        self._inv.fill_(1.0 / self.scale)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, self._found, self._inv)
        return bool(self._found.item())

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale, self.good, self.overflows = self.scale * 0.5, 0, self.overflows + 1
            return
        self.good += 1
        if self.good == self.growth_every:
            self.scale, self.good = self.scale * 2.0, 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good": self.good, "overflows": self.overflows}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good = float(state["scale"]), int(state["good"])
        self.overflows = int(state.get("overflows", 0))
