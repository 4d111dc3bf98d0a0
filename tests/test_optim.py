"""The optimizer's step without torch's dynamo-importing wrappers (optim.step_function):
the same floats as optimizer.step, and the plain step wherever something asks more of it."""

import subprocess
import sys

import pytest
import torch

from dist_train.train.optim import step_function

from .helpers import ROOT


def _train(cls, kwargs, use_function: bool, steps: int = 12):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = cls(model.parameters(), **kwargs)
    step = step_function(opt) if use_function else opt.step
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(32, 20, generator=g), torch.randint(0, 3, (32,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        step()
    return [p.detach().clone() for p in model.parameters()], opt.state_dict()


@pytest.mark.parametrize("cls, kwargs", [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "fused": True}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    (torch.optim.Adam, {"lr": 1e-2, "fused": True}),
    (torch.optim.AdamW, {"lr": 1e-2}),
    (torch.optim.RMSprop, {"lr": 1e-2}),
    (torch.optim.Adagrad, {"lr": 1e-2}),
])
def test_the_step_function_gives_optimizer_step_bit_for_bit(cls, kwargs):
    torch.manual_seed(0)
    opt = cls(torch.nn.Linear(2, 2).parameters(), **kwargs)
    assert step_function(opt) != opt.step  # the short path is taken for torch's own optimizers
    plain, plain_state = _train(cls, kwargs, False)
    short, short_state = _train(cls, kwargs, True)
    assert all(torch.equal(a, b) for a, b in zip(plain, short))
    assert all(torch.equal(a, b) for s in plain_state["state"] for a, b in
               zip(plain_state["state"][s].values(), short_state["state"][s].values()))


def test_hooks_and_the_profiler_get_the_plain_step():
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = step_function(opt)
    model(torch.ones(1, 4)).sum().backward()
    calls = []
    handle = opt.register_step_post_hook(lambda *a: calls.append("post"))
    step()
    assert calls == ["post"]
    handle.remove()
    with torch.profiler.profile() as prof:
        step()
    assert any("Optimizer.step#SGD.step" in e.name for e in prof.events())
    assert calls == ["post"]  # (removed: not called again)


def test_a_local_run_never_imports_torch_dynamo_or_sympy(tmp_path):
    """~0.9 s and ~0.5 s of every worker's start-up; nothing in a run that compiles nothing needs them."""
    code = ("import sys; from dist_train.launchers import local; "
            f"assert local.main(['{ROOT}/conf/digits.yaml', '--out', '{tmp_path}/run', '--set', 'train.max_steps=3',"
            " '--set', 'checkpoint.every_steps=1']) == 0; "
            "print(sorted(m for m in ('torch._dynamo', 'sympy', 'torch.fx.experimental.symbolic_shapes') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_from_gives_loss_backward_bit_for_bit(dtype):
    from dist_train.train.step import backward_from

    grads = []
    for short in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)
        x, y = torch.randn(32, 20, dtype=dtype), torch.randint(0, 3, (32,))
        loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum")
        scale = torch.full((), 1 / 96, dtype=dtype)
        backward_from(loss, scale) if short else loss.backward(scale)
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    with pytest.raises(RuntimeError, match="does not require grad"):
        backward_from(torch.ones(()), scale)  # torch's own message
