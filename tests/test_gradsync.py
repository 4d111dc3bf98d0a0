"""Oracle: gradients averaged over simulated ranks equal the whole batch's gradient."""

import copy
import signal

import pytest
import torch

from dist_train import models
from dist_train.comm import LocalComm
from dist_train.train import gradsync, losses, metrics
from dist_train.train.gradsync import FusedGrads, broadcast_parameters, parameter_checksums

from .helpers import PosedComm, run_threads


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
        fused = FusedGrads(m, comm, metrics=1)
        fused.zero()
        xs, ys = x[bounds[comm.rank]:bounds[comm.rank + 1]], y[bounds[comm.rank]:bounds[comm.rank + 1]]
        loss, right = 0.0, 0
        if len(xs):
            out = m(xs)
            loss = losses.loss_sum("cross_entropy", out, ys)
            (loss / len(x)).backward()  # scaled by 1 / the global count before backward, as the step does
            right = float(metrics.accuracy(out, ys)[0])
        stats = fused.sync(comm, len(xs), loss.detach() if len(xs) else 0.0, (right, len(xs)))
        return torch.cat([p.grad.reshape(-1) for p in m.parameters()]), stats

    full_loss = float(losses.loss_sum("cross_entropy", model(x), y).detach()) / len(x)
    for grads, stats in run_threads(len(sizes), rank):
        torch.testing.assert_close(grads, expected, atol=1e-12, rtol=1e-12)
        assert stats.count == len(x)
        assert stats.loss == pytest.approx(full_loss, rel=1e-12)
        assert stats.metrics == ((float((model(x).argmax(1) == y).sum()), len(x)),)  # summed exactly


def test_grads_are_views_into_the_flat_buffer():
    model = make_model()
    fused = FusedGrads(model, PosedComm())
    model(torch.randn(4, 5, dtype=torch.float64)).sum().backward()
    assert fused.flat[:fused.n].abs().sum() > 0
    for p in model.parameters():
        assert p.grad.untyped_storage().data_ptr() == fused.flat.untyped_storage().data_ptr()
    fused.zero()
    assert all(p.grad.abs().sum() == 0 for p in model.parameters())


def test_non_finite_losses_are_flagged_with_their_ranks_and_the_samples_summed():
    model = make_model()

    def rank(comm):
        fused = FusedGrads(copy.deepcopy(model), comm, metrics=2)
        fused.zero()
        loss = float("nan") if comm.rank in (1, 3) else 1.5
        return fused.sync(comm, comm.rank + 1, loss, (comm.rank, 1, 2 * comm.rank, 3), arrived=0.1 * comm.rank)

    for r, stats in enumerate(run_threads(4, rank)):
        assert stats.nonfinite_ranks == (1, 3) and stats.loss != stats.loss  # NaN
        assert stats.count == 10 and stats.metrics == ((6, 4), (12, 12))
        assert stats.waited == pytest.approx(0.3 - 0.1 * r)  # from the last one's arrival, told apart on every rank


def test_a_stop_asked_of_any_worker_reaches_every_worker_in_the_same_step():
    model = make_model()

    def rank(comm):
        fused = FusedGrads(copy.deepcopy(model), comm)
        fused.zero()
        stop = {1: int(signal.SIGTERM), 2: int(signal.SIGUSR1)}.get(comm.rank, 0)
        asked = fused.sync(comm, 1, 1.0, stop=stop)
        fused.zero()
        return asked, fused.sync(comm, 1, 1.0)  # and the next step asks nothing

    for asked, after in run_threads(3, rank):
        assert asked.stop == ((1, signal.SIGTERM), (2, signal.SIGUSR1)) and not asked.nonfinite_ranks
        assert after.stop == ()


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


def test_broadcast_goes_in_place_and_in_chunks_of_any_dtype(monkeypatch):
    """Tensors of BROADCAST_CHUNK bytes or more go alone, in place; smaller ones travel packed,
    a chunk per dtype; a non-contiguous one is packed too."""
    monkeypatch.setattr(gradsync, "BROADCAST_CHUNK", 64)

    def rank(comm):
        torch.manual_seed(comm.rank)
        m = torch.nn.Sequential(torch.nn.Linear(10, 5), torch.nn.Linear(5, 3))  # 200 B, 20 B, 60 B, 12 B
        m.register_buffer("stats", torch.randn(3, dtype=torch.float64))
        m.register_buffer("steps", torch.tensor(comm.rank))  # not floating: left alone
        m[0].weight.data = torch.randn(5, 10).t().contiguous().t()  # non-contiguous
        broadcast_parameters(comm, m)
        return {k: v.clone() for k, v in m.state_dict().items()}

    got = run_threads(3, rank)
    for r in (1, 2):
        for k, v in got[0].items():
            assert torch.equal(v, got[r][k]) == (k != "steps"), (r, k)


class TwoHeads(torch.nn.Module):
    """LeNet-sized conv body (cleared by zero()) and two in-place heads, one of which a step may skip."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.body = models.LeNet((1, 8, 8), 6)
        self.other = models.Linear(6, 2)

    def forward(self, x, both):
        out = self.body(x)
        return out + self.other(out).sum(1, keepdim=True) if both else out


@pytest.mark.parametrize("world", [1, 2], ids=["world-of-one", "two-workers"])
@pytest.mark.parametrize("micro", [1, 3])
def test_layers_writing_their_own_gradients_match_autograd_bit_for_bit(micro, world):
    """Steps 0 and 1 use both heads, step 2 skips one (its gradients must be zeros),
    `micro` micro-batches a step; the same gradients and weights as autograd accumulating
    (a world of one: autograd's own tensors for everything but the in-place layers)."""
    model = TwoHeads()

    def rank(comm):
        got = {}
        for in_place in (True, False):
            m = copy.deepcopy(model)
            fused = FusedGrads(m, comm, grads_in_place=in_place, in_place_min_bytes=0)
            scale = 1.0 / (5 * micro * comm.world_size)  # 1 / the global count
            opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
            gen = torch.Generator().manual_seed(10 + comm.rank)
            flats = []
            for step in range(3):
                fused.zero()
                for _ in range(micro):
                    x, y = torch.randn(5, 1, 8, 8, generator=gen), torch.randint(0, 6, (5,), generator=gen)
                    loss = losses.loss_sum("cross_entropy", m(x, both=step < 2), y)
                    (loss * scale).backward()
                fused.sync(comm, 5 * micro, 0.0)
                flats.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]))
                opt.step()
            got[in_place] = (flats, [p.detach().clone() for p in m.parameters()], len(fused.in_place))
        return got

    for got in run_threads(world, rank):
        (flats, weights, layers), (flats_ref, weights_ref, none) = got[True], got[False]
        assert (layers, none) == (4, 0)  # LeNet's three and the extra head
        assert all(torch.equal(a, b) for a, b in zip(flats, flats_ref))
        assert all(torch.equal(a, b) for a, b in zip(weights, weights_ref))
        assert flats[2][-12:].abs().sum() == 0 and flats[1][-12:].abs().sum() > 0  # the skipped head: zeros


def test_a_shared_parameter_keeps_autograd_accumulating():
    tied = torch.nn.Sequential(models.Linear(4, 4), torch.nn.Tanh(), models.Linear(4, 4))
    tied[2].weight = tied[0].weight  # also gets a gradient through the other layer
    fused = FusedGrads(tied, PosedComm(), in_place_min_bytes=0)
    assert fused.in_place == []
    x = torch.randn(3, 4)
    tied(x).sum().backward()
    ref = copy.deepcopy(tied)
    for p in ref.parameters():
        p.grad = None
    ref(x).sum().backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(tied.parameters(), ref.parameters()))


def test_only_layers_large_enough_to_pay_write_in_place():
    mlp = models.mlp(784, [512, 512], 10)  # 1.6 MB, 1 MB and 20 KB weights
    assert [m.out_features for m in FusedGrads(copy.deepcopy(mlp), PosedComm()).in_place] == [512, 512]
    assert FusedGrads(copy.deepcopy(mlp), LocalComm()).in_place == []  # a world of one: below 32 MB
    assert FusedGrads(copy.deepcopy(mlp), PosedComm(), grads_in_place=False).in_place == []


def test_parameter_checksums_change_with_one_ulp_of_any_parameter():
    """The drift check compares these across workers: a change of one bit anywhere shows
    (odd sizes end in partial 8-byte words; a parameter viewing another at an odd offset)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 1))
    odd = torch.nn.Parameter(torch.randn(8)[1:])  # storage offset 1: not 8-byte aligned
    model.register_parameter("odd", odd)
    comm = LocalComm()
    base = parameter_checksums(comm, model)
    for p in model.parameters():
        for i in range(p.numel()):
            with torch.no_grad():
                old = p.view(-1)[i].clone()
                p.view(-1)[i] = torch.nextafter(old, torch.tensor(float("inf")))
            assert parameter_checksums(comm, model) != base, (p.shape, i)
            with torch.no_grad():
                p.view(-1)[i] = old
    assert parameter_checksums(comm, model) == base
