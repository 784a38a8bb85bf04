"""Gradient accumulation: ``k`` micro-batches through ``backward(..., accumulate=True)`` equal one
batch of all their samples (float64, against jacrev and an independent UPGrad)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import UPGrad
from tests._references import upgrad_reference


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def _jacobian(model: nn.Module, losses_of, names=None) -> torch.Tensor:
    """The ``[m, n]`` Jacobian of ``losses_of(model)`` w.r.t. the named parameters, by jacrev."""
    params = {k: v.detach() for k, v in model.named_parameters() if names is None or k in names}

    def f(p):
        return losses_of(lambda x: functional_call(model, p, (x,)))

    jac = jacrev(f)(params)
    return torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in params], dim=1)


def _grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _split(update: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    return list(update.split([p.numel() for p in model.parameters()]))


def _task_losses(x, y):
    return lambda f: ((f(x) - y) ** 2).mean(dim=0)  # 3 task losses, means over the samples


def _sample_losses(x, y):
    return lambda f: ((f(x) - y) ** 2).sum(dim=1)  # one loss per sample


def test_mean_mode_equals_the_big_batch_of_task_losses():
    model = _mlp()
    x, y = torch.randn(12, 5), torch.randn(12, 3)
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad())
    for i, (xs, ys) in enumerate(zip(x.split(4), y.split(4), strict=True)):
        opt.backward(_task_losses(xs, ys)(model), accumulate=i < 2)
    # Equal micro-batches: the mean of their task-loss vectors is the big batch's vector.
    expected = upgrad_reference(_jacobian(model, _task_losses(x, y)))
    torch.testing.assert_close(_grads(model), expected, rtol=1e-7, atol=1e-9)

    big = copy.deepcopy(model)
    for p in big.parameters():
        p.grad = None
    big_opt = JacobianOptimizer(torch.optim.SGD(big.parameters(), lr=0.1), UPGrad())
    big_opt.backward(_task_losses(x, y)(big))
    torch.testing.assert_close(_grads(model), _grads(big), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("path", ["auto", "jacobian"])
def test_concat_mode_equals_the_big_batch_of_per_sample_losses(path):
    """Unequal micro-batches (3, 5, 4 samples); per-sample engine and Jacobian path."""
    model = _mlp(1)
    x, y = torch.randn(12, 5), torch.randn(12, 3)
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), batch_dim=0, path=path
    )
    assert opt.cross_rank == "concat"  # the default with per-sample losses
    sizes = [3, 5, 4]
    for i, (xs, ys) in enumerate(zip(x.split(sizes), y.split(sizes), strict=True)):
        returned = opt.backward(_sample_losses(xs, ys)(model), accumulate=i < 2)
        assert returned.shape == (sizes[i],)
    expected = upgrad_reference(_jacobian(model, _sample_losses(x, y)))
    torch.testing.assert_close(_grads(model), expected, rtol=1e-7, atol=1e-9)


def test_mean_mode_of_per_sample_losses_uses_the_per_sample_engine_exactly():
    """Three micro-batches of 4 per-sample losses, averaged: loss i is the mean of the i-th
    samples' losses. The per-sample engine forms the mean Jacobian's Gramian from the layer
    pieces of the concatenation (``P G Pᵀ``); compared with UPGrad of jacrev's Jacobian."""
    model = _mlp(4)
    x, y = torch.randn(12, 5), torch.randn(12, 3)
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), batch_dim=0, cross_rank="mean"
    )
    for i, (xs, ys) in enumerate(zip(x.split(4), y.split(4), strict=True)):
        opt.backward(_sample_losses(xs, ys)(model), accumulate=i < 2)
    assert opt._path.record.route == "samples" and opt._path.record.m == 4

    def mean_of_samples(f):
        return _sample_losses(x, y)(f).view(3, 4).mean(dim=0)

    expected = upgrad_reference(_jacobian(model, mean_of_samples))
    torch.testing.assert_close(_grads(model), expected, rtol=1e-7, atol=1e-9)
    jacobian = _jacobian(model, mean_of_samples)
    torch.testing.assert_close(opt._path.record.gramian, jacobian @ jacobian.T)


def test_mean_mode_of_task_losses_uses_the_layer_gramian_engine_exactly():
    """Three micro-batches of task losses through the layer-Gramian engine (``path="gramian"``):
    the mean Jacobian's Gramian comes from the concatenated layer inputs and output gradients."""
    model = _mlp(5)
    x, y = torch.randn(12, 5), torch.randn(12, 3)
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), path="gramian")
    for i, (xs, ys) in enumerate(zip(x.split(4), y.split(4), strict=True)):
        opt.backward(_task_losses(xs, ys)(model), accumulate=i < 2)
    assert opt._path.record.route == "layers"
    jacobian = _jacobian(model, _task_losses(x, y))
    torch.testing.assert_close(_grads(model), upgrad_reference(jacobian), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(opt._path.record.gramian, jacobian @ jacobian.T)


def test_concat_mode_when_the_layer_shapes_differ_between_micro_batches():
    """Sequences of length 2 then 3: no common closed form, the rows are materialised."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    a, b = torch.randn(3, 2, 4), torch.randn(4, 3, 4)

    def losses_of(x):
        return lambda f: f(x).pow(2).sum(dim=(1, 2))

    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), batch_dim=0)
    opt.backward(losses_of(a)(model), accumulate=True)
    opt.backward(losses_of(b)(model))
    jacobian = torch.cat([_jacobian(model, losses_of(a)), _jacobian(model, losses_of(b))])
    torch.testing.assert_close(_grads(model), upgrad_reference(jacobian), rtol=1e-7, atol=1e-9)


class _MaskedAttention(nn.Module):
    """Causal self-attention with a padding mask that differs between samples: the closed form
    of a masked call is replayed in its own micro-batch, its rows then cross micro-batches."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        t = x.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        padding = torch.zeros(x.shape[0], t, dtype=torch.bool)
        padding[::2, -1] = True
        return self.head(self.attention(x, x, x, padding, attn_mask=causal)[0].mean(1))


@pytest.mark.parametrize("cross_rank", ["concat", "mean"])
def test_micro_batches_of_masked_attention(cross_rank):
    model = _MaskedAttention()
    x, y = torch.randn(8, 5, 4), torch.randn(8, 3)
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), batch_dim=0, cross_rank=cross_rank
    )
    for i, (xs, ys) in enumerate(zip(x.split(4), y.split(4), strict=True)):
        opt.backward(_sample_losses(xs, ys)(model), accumulate=i == 0)
    assert opt._path.record.route == "samples"
    if cross_rank == "concat":
        expected = upgrad_reference(_jacobian(model, _sample_losses(x, y)))
    else:
        first, second = (
            _jacobian(model, _sample_losses(x[s], y[s])) for s in (slice(4), slice(4, 8))
        )
        expected = upgrad_reference((first + second) / 2)
    torch.testing.assert_close(_grads(model), expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("batch_dim", [None, 0])
def test_shared_params_heads_get_the_combined_summed_gradient(batch_dim):
    model = _mlp(3)
    trunk, head = model[0], model[2]
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    losses_of = _task_losses if batch_dim is None else _sample_losses
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        UPGrad(),
        shared_params=trunk.parameters(),
        batch_dim=batch_dim,
    )
    for i, (xs, ys) in enumerate(zip(x.split(4), y.split(4), strict=True)):
        opt.backward(losses_of(xs, ys)(model), accumulate=i == 0)
    names = {"0.weight", "0.bias"}
    trunk_update = upgrad_reference(_jacobian(model, losses_of(x, y), names))
    head_grad = _jacobian(model, losses_of(x, y), {"2.weight", "2.bias"}).sum(dim=0)
    got_trunk = torch.cat([p.grad.reshape(-1) for p in trunk.parameters()])
    got_head = torch.cat([p.grad.reshape(-1) for p in head.parameters()])
    torch.testing.assert_close(got_trunk, trunk_update, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(got_head, head_grad, rtol=1e-9, atol=1e-11)


def test_step_with_closure_consumes_the_accumulated_micro_batches():
    """The closure's zero_grad keeps the micro-batches: one SGD step along the big batch's JD."""
    model = _mlp(4)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(6, 5), torch.randn(6, 3)
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), UPGrad(), batch_dim=0)
    expected = upgrad_reference(_jacobian(model, _sample_losses(x, y)))
    opt.backward(_sample_losses(x[:2], y[:2])(model), accumulate=True)

    def closure():
        opt.zero_grad()
        return _sample_losses(x[2:], y[2:])(model)

    losses = opt.step(closure)
    assert losses.shape == (4,)  # the local (last micro-batch's) losses
    for p, p0, u in zip(model.parameters(), before, _split(expected, model), strict=True):
        torch.testing.assert_close(p.detach(), p0 - 0.5 * u.view_as(p), rtol=1e-7, atol=1e-9)
    # Nothing is left over: the next backward is a plain one.
    assert opt._path.pending is None


def test_bad_accumulation_inputs_raise_precise_errors():
    model = _mlp()
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad())
    x = torch.randn(4, 5)
    with pytest.raises(TypeError, match="accumulate must be a bool"):
        opt.backward(model(x).sum(dim=0), accumulate=1)
    opt.backward(model(x).sum(dim=0), accumulate=True)  # 3 losses
    with pytest.raises(ValueError, match="same number of losses: got 4 losses after 3"):
        opt.backward(model(x).sum(dim=1))  # 4 losses
    assert opt._path.pending is None  # a failed call drops the accumulated micro-batches
    assert all(p.grad is None for p in model.parameters())  # and writes nothing
    with pytest.raises(ValueError, match="cross_rank must be 'mean', 'concat' or None, got 'sum'"):
        JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), cross_rank="sum")
