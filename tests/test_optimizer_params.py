"""Odd parameters at the optimizer level: listed twice, mixed dtypes, sparse gradients.

Each expected update comes from ``torch.func.jacrev`` on an all-float64 copy of the model and an
independent float64 aggregation (NNLS UPGrad, or the trimmed mean's definition). The data are
scikit-learn's digits (offline), a per-sample cross-entropy per loss.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import TrimmedMean, UPGrad
from tests._references import upgrad_reference

# Each route of the path: (constructor keywords, backward in two micro-batches?).
ROUTES = {
    "jacobian": ({}, False),
    "samples": ({"batch_dim": 0}, False),
    "layers": ({"path": "gramian"}, False),
    "accumulated_jacobian": ({"cross_rank": "concat"}, True),
    "accumulated_samples": ({"batch_dim": 0}, True),
}


def _digits(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    rows = np.random.default_rng(seed).choice(len(x), n, replace=False)
    return torch.tensor(x[rows] / 16.0), torch.tensor(y[rows])


class _Net(nn.Module):
    """64-12-10 MLP on digits; ``second`` runs in its own dtype (float64 in the mixed case)."""

    def __init__(self, dtype: torch.dtype = torch.float64, second: torch.dtype | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(64, 12).to(dtype)
        self.second = nn.Linear(12, 10).to(second or dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x.to(self.first.weight.dtype)))
        return self.second(h.to(self.second.weight.dtype))


def _losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y, reduction="none")  # one loss per sample


def _reference_jacobian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[m, n]`` Jacobian of the per-sample losses of an all-float64 copy, by jacrev."""
    model64 = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in model64.named_parameters()}
    jac = jacrev(lambda p: _losses(lambda t: functional_call(model64, p, (t,)), x, y))(params)
    return torch.cat([jac[k].reshape(len(y), -1) for k in params], dim=1)


def _backward(opt: JacobianOptimizer, model, x, y, split: bool) -> None:
    if split:
        opt.backward(_losses(model, x[:5], y[:5]), accumulate=True)
        opt.backward(_losses(model, x[5:], y[5:]))
    else:
        opt.backward(_losses(model, x, y))


def _grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.double().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("route", ROUTES)
def test_a_parameter_listed_twice_is_differentiated_and_written_once(route):
    kwargs, split = ROUTES[route]
    model = _Net()
    x, y = _digits(9)
    w1, b1, w2, b2 = model.parameters()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns about the duplicates
        inner = torch.optim.SGD([w1, b1, w1, w2, b2, w2, w1], lr=0.1)
    opt = JacobianOptimizer(inner, UPGrad(), **kwargs)
    _backward(opt, model, x, y, split)
    expected = upgrad_reference(_reference_jacobian(model, x, y))
    torch.testing.assert_close(_grads(model), expected, rtol=1e-6, atol=1e-9)


def test_shared_params_listed_twice_are_aggregated_once():
    model = _Net()
    x, y = _digits(9, seed=1)
    w1, b1 = model.first.weight, model.first.bias
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), shared_params=[w1, b1, w1, b1]
    )
    _backward(opt, model, x, y, split=False)
    jacobian = _reference_jacobian(model, x, y)
    trunk = w1.numel() + b1.numel()
    expected = torch.cat([upgrad_reference(jacobian[:, :trunk]), jacobian[:, trunk:].sum(dim=0)])
    torch.testing.assert_close(_grads(model), expected, rtol=1e-6, atol=1e-9)


def test_a_parameter_in_two_groups_is_refused_by_torch_and_changes_nothing():
    model = _Net()
    opt = JacobianOptimizer(torch.optim.SGD(model.first.parameters(), lr=0.1), UPGrad())
    groups = copy.copy(opt.param_groups)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [model.second.weight, model.first.weight]})
    assert opt.param_groups == groups


def _trimmed_mean_reference(jacobian: torch.Tensor, trim: int) -> torch.Tensor:
    columns = np.sort(jacobian.numpy(), axis=0)
    return torch.from_numpy(columns[trim : len(columns) - trim].mean(axis=0))


@pytest.mark.parametrize("aggregator", ["upgrad", "trimmed_mean"])
@pytest.mark.parametrize("cross_rank, split", [("mean", False), ("concat", True)])
def test_float32_and_float64_parameters_in_one_model(aggregator, cross_rank, split):
    model = _Net(torch.float32, second=torch.float64)
    x, y = _digits(10, seed=2)
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        UPGrad() if aggregator == "upgrad" else TrimmedMean(trim_number=2),
        cross_rank=cross_rank,
    )
    _backward(opt, model, x, y, split)
    jacobian = _reference_jacobian(model, x, y)
    if aggregator == "upgrad":
        expected = upgrad_reference(jacobian)
        assert opt._path.record.gramian.dtype == torch.float64  # one accumulation dtype
    else:
        expected = _trimmed_mean_reference(jacobian, 2)
    for p in model.parameters():
        assert p.grad.dtype == p.dtype  # each .grad in its parameter's dtype
    # The float32 layer's forward rounds at float32: compare at that level.
    torch.testing.assert_close(_grads(model), expected, rtol=2e-4, atol=1e-6)


class _Bag(nn.Module):
    def __init__(self, sparse: bool, bag: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        kind = nn.EmbeddingBag if bag else nn.Embedding
        self.embedding = kind(16, 4, sparse=sparse)
        self.head = nn.Linear(4, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = self.embedding(
            idx.unsqueeze(1) if isinstance(self.embedding, nn.EmbeddingBag) else idx
        )
        return self.head(rows).pow(2).sum(dim=1)  # one loss per index


@pytest.mark.parametrize("bag", [False, True])
@pytest.mark.parametrize("route", ["jacobian", "layers", "accumulated_jacobian"])
def test_a_sparse_gradient_raises_a_precise_error_and_changes_nothing(route, bag):
    kwargs, split = ROUTES[route]
    model = _Bag(sparse=True, bag=bag)
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), UPGrad(), **kwargs
    )
    idx = torch.tensor([1, 5, 5, 9, 2, 7])
    opt.step(lambda: model.head(torch.ones(4)).sum(dim=0, keepdim=True))  # momentum state
    for p in model.parameters():
        p.grad = torch.randn_like(p)
        p.jac = torch.randn(2, *p.shape)
    before = [(p.detach().clone(), p.grad.clone(), p.jac.clone()) for p in model.parameters()]
    state = copy.deepcopy(opt.optimizer.state_dict())
    node = "EmbeddingBagBackward0" if bag else "EmbeddingBackward0"
    with pytest.raises(
        ValueError,
        match=rf"parameter 0 of the optimizer \(shape \(16, 4\)\) gets a sparse gradient from "
        rf"{node}.*sparse=False",
    ):
        if split:
            opt.backward(model(idx[:3]), accumulate=True)
        opt.step(lambda: model(idx))
    for p, (value, grad, jac) in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, value) and torch.equal(p.grad, grad) and torch.equal(p.jac, jac)
    assert str(opt.optimizer.state_dict()) == str(state)


def test_sparse_embeddings_are_supported_by_the_per_sample_engine():
    idx = torch.tensor([1, 5, 5, 9, 2, 7])
    grads = []
    for sparse in (True, False):
        model = _Bag(sparse=sparse)
        opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), batch_dim=0)
        opt.backward(model(idx))
        assert all(p.grad.layout == torch.strided for p in model.parameters())
        grads.append([p.grad for p in model.parameters()])
    for sparse_grad, dense_grad in zip(*grads, strict=True):
        torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-6, atol=1e-7)
