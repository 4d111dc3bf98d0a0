"""Oracle: gradients averaged over simulated ranks equal the whole batch's gradient."""

import copy

import pytest
import torch

from dist_train import losses
from dist_train.gradsync import FusedGrads, broadcast_parameters

from .helpers import run_threads


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


def full_batch_grad(model, x, y):
    m = copy.deepcopy(model)
    (losses.loss_sum("cross_entropy", m(x), y) / len(x)).backward()
    return torch.cat([p.grad.reshape(-1) for p in m.parameters()])


@pytest.mark.parametrize("sizes", [[10], [5, 5], [3, 3, 4], [4, 0, 6], [0, 10], [1, 2, 3, 4]])
def test_allreduced_gradient_equals_full_batch_gradient(sizes):
    torch.manual_seed(1)
    x = torch.randn(sum(sizes), 5, dtype=torch.float64)
    y = torch.randint(0, 3, (sum(sizes),))
    model = make_model()
    expected = full_batch_grad(model, x, y)
    bounds = [sum(sizes[:r]) for r in range(len(sizes) + 1)]

    def rank(comm):
        m = copy.deepcopy(model)
        fused = FusedGrads(m)
        fused.zero()
        xs, ys = x[bounds[comm.rank]:bounds[comm.rank + 1]], y[bounds[comm.rank]:bounds[comm.rank + 1]]
        loss, right = 0.0, 0
        if len(xs):
            out = m(xs)
            loss = losses.loss_sum("cross_entropy", out, ys)
            loss.backward()
            right = losses.correct("cross_entropy", out, ys)
        stats = fused.sync(comm, len(xs), loss.detach() if len(xs) else 0.0, right, False)
        return fused.grads.clone(), stats

    full_loss = float(losses.loss_sum("cross_entropy", model(x), y).detach()) / len(x)
    for grads, stats in run_threads(len(sizes), rank):
        torch.testing.assert_close(grads, expected, atol=1e-12, rtol=1e-12)
        assert stats.count == len(x)
        assert stats.loss == pytest.approx(full_loss, rel=1e-12)


def test_grads_are_views_into_the_flat_buffer():
    model = make_model()
    fused = FusedGrads(model)
    model(torch.randn(4, 5, dtype=torch.float64)).sum().backward()
    assert fused.grads.abs().sum() > 0
    for p in model.parameters():
        assert p.grad.untyped_storage().data_ptr() == fused.flat.untyped_storage().data_ptr()
    fused.zero()
    assert all(p.grad.abs().sum() == 0 for p in model.parameters())


def test_more_flag_is_or_over_workers():
    model = make_model()

    def rank(comm):
        fused = FusedGrads(copy.deepcopy(model))
        fused.zero()
        return fused.sync(comm, 1, 0.0, 0, more=comm.rank == 2).more

    assert run_threads(3, rank) == [True, True, True]


def test_broadcast_makes_parameters_equal_to_rank_0():
    def rank(comm):
        m = torch.nn.Linear(3, 2)
        with torch.no_grad():  # every rank starts different: rank r holds r + 1 everywhere
            for p in m.parameters():
                p.fill_(comm.rank + 1.0)
        broadcast_parameters(comm, m)
        return torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    for got in run_threads(3, rank):
        assert torch.equal(got, torch.ones(8))
