"""The optimizer a config names: any torch.optim class (by name, any case) or a class by
import path, with train.lr, train.weight_decay, train.momentum where it takes them, and
train.optimizer_kwargs."""

from __future__ import annotations

import functools
import inspect
import sys

import torch

from .. import config, usercode
from ..errors import ConfigError, first_line

FUSED_CPU_OPTIMIZERS = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)


def optimizer_class(name: str) -> type:
    if config.is_target(name):
        return usercode.load(name, "train.optimizer")
    return getattr(torch.optim, config.optimizer_names()[name.lower()])


def make_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer, with its fused kernel where torch has one for the parameters'
    device (CPU: SGD, Adam, AdamW, Adagrad; CUDA: SGD, Adam, AdamW): one pass over
    parameter, gradient and state instead of one per operation (the wide MLP's SGD step on
    the CPU: 14 -> 9 ms). Where torch refuses the fused kernel, the plain one."""
    t = cfg.train
    cls = optimizer_class(t.optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        accepts = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        accepts = {}
    kwargs = {"lr": t.lr}
    if t.weight_decay or "weight_decay" in accepts:
        kwargs["weight_decay"] = t.weight_decay
    if t.momentum or ("momentum" in accepts and cls is torch.optim.SGD):
        kwargs["momentum"] = t.momentum
    kwargs.update(t.optimizer_kwargs)
    device = params[0].device.type if params else "cpu"
    fused = "fused" in accepts and "fused" not in kwargs and params and \
        (device == "cuda" or (device == "cpu" and FUSED_CPU_OPTIMIZERS))
    if fused:
        try:
            return cls(params, **kwargs, fused=True)
        except (TypeError, ValueError, RuntimeError):
            pass  # not for this optimizer, device or dtype: the plain kernels (a bad kwarg fails below)
    try:
        return cls(params, **kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError("train.optimizer_kwargs" if t.optimizer_kwargs else "train.optimizer",
                          f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: "
                          f"{first_line(e)}") from None


def step_function(optimizer: torch.optim.Optimizer):
    """A callable that takes `optimizer`'s step: `optimizer.step` itself, or, for torch's
    own optimizers while nothing asks more of it, the function its wrappers wrap, called as
    they would call it. The wrappers (profile_hook_step's hooks and profiler label,
    _use_grad_for_differentiable's grad mode) import torch._dynamo on the first step (~0.9 s
    of every worker's start-up here) to call its graph_break(), a no-op outside
    torch.compile. The plain step runs instead wherever a step hook is registered, the
    profiler records, torch._dynamo is imported (a user may be compiling), or the wrappers
    are not the ones this was written against (another torch, a user's optimizer)."""
    from torch.optim import optimizer as module

    plain = optimizer.step
    use_grad = getattr(type(optimizer).step, "__wrapped__", None)  # profile_hook_step's
    raw = getattr(use_grad, "__wrapped__", None)  # _use_grad_for_differentiable's
    helper = getattr(module, "_use_grad_for_differentiable", None)
    if raw is None or helper is None or getattr(use_grad, "__code__", None) is not helper(lambda: None).__code__:
        return plain
    hooks = (optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks,
             getattr(module, "_global_optimizer_pre_hooks", {}), getattr(module, "_global_optimizer_post_hooks", {}))
    differentiable = bool(optimizer.defaults.get("differentiable", False))
    profiling = getattr(getattr(torch._C, "_autograd", None), "_profiler_enabled", lambda: True)

    def step():
        if any(hooks) or "torch._dynamo" in sys.modules or profiling():
            return plain()
        with torch.set_grad_enabled(differentiable):
            return raw(optimizer)

    return step


def _call_until_dynamo(fn):
    """`fn` itself while torch._dynamo is not imported (then nothing can be compiling, and
    torch's dynamo-disabling wrapper would only call it); torch._dynamo.disable(fn) from
    the moment it is (a user's torch.compile), as torch's own wrapper does."""
    disabled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if disabled is None:
            disabled = torch._dynamo.disable(fn, recursive=True)
        return disabled(*args, **kwargs)

    return call


def _defer_dynamo_import() -> None:
    """torch.optim.Optimizer's add_param_group, zero_grad, state_dict and load_state_dict
    are wrapped in torch._disable_dynamo, whose first call imports torch._dynamo: ~0.9 s
    here, half of a local run's start-up, for a run that compiles nothing. Each wrapper
    looks up the function's cached `__dynamo_disable` first; giving it _call_until_dynamo
    keeps torch._dynamo unimported until something else imports it (no-op on a torch
    without these wrappers)."""
    make = getattr(getattr(torch, "_compile", None), "_disable_dynamo", None)
    if make is None:
        return
    inner = make(lambda: None).__code__  # the code of every wrapper it makes
    for attr in vars(torch.optim.Optimizer).values():
        fn = getattr(attr, "__wrapped__", None)
        if getattr(attr, "__code__", None) is inner and fn is not None and not hasattr(fn, "__dynamo_disable"):
            fn.__dynamo_disable = _call_until_dynamo(fn)


_defer_dynamo_import()
