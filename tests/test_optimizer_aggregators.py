"""Every entry of ``AGGREGATORS_UNDER_TEST`` drives ``JacobianOptimizer`` and the functional API.

For each entry, two SGD steps on a tiny float64 MLP with a vector of losses are compared with the
same steps computed independently: the Jacobian from ``torch.func.jacrev`` (flattened in parameter
order), a freshly built, identically seeded aggregator applied to it, then ``p - lr · update``.
Two steps, so that stateful methods (momentum, warm-up, running statistics, random generators) are
compared after their state has moved.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import jdoptim
from jdoptim import JacobianOptimizer
from tests.aggregation._table import AGGREGATORS_UNDER_TEST, Entry

M = 4  # number of losses
LR = 0.1
STEPS = 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, M)).double()


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randn(8, M, generator=g, dtype=torch.float64) * 2.0
    return x, y


def losses_of(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One loss per output (``[M]``): every loss depends on the shared first layer."""
    return ((output - y) ** 2).mean(dim=0)


def reference_params(entry: Entry) -> list[torch.Tensor]:
    """``STEPS`` steps of ``p - lr · A(J)`` with ``J`` from ``jacrev`` and a fresh aggregator."""
    model = make_model()
    x, y = make_data()
    names = [name for name, _ in model.named_parameters()]
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    aggregator = entry.make(M)

    def losses(p):
        return losses_of(functional_call(model, p, (x,)), y)

    for _ in range(STEPS):
        jacobians = jacrev(losses)(params)
        matrix = torch.cat([jacobians[name].reshape(M, -1) for name in names], dim=1)
        update = aggregator(matrix)
        offset = 0
        for name in names:
            size = params[name].numel()
            chunk = update[offset : offset + size].view_as(params[name])
            params[name] = params[name] - LR * chunk
            offset += size
    return [params[name] for name in names]


def assert_same_params(entry: Entry, actual: list[torch.Tensor], expected: list[torch.Tensor]):
    """Equal up to float64 rounding. The engine forms the Gramian block by block, so a solver
    sees a Gramian that differs from ``J Jᵀ`` by rounding; measured errors are below 3e-12, and
    1e-10 leaves no room for a solver stopping at a different iterate."""
    scale = max(float(p.abs().max()) for p in expected)
    tol = 1e-10 * scale
    for a, e in zip(actual, expected, strict=True):
        error = float((a.detach() - e).abs().max())
        assert error <= tol, f"{entry}: parameters differ by {error:.3e} > {tol:.3e}"


ENTRIES = pytest.mark.parametrize("entry", AGGREGATORS_UNDER_TEST, ids=str)


def test_the_losses_conflict():
    """The fixture is meaningful: some pair of per-loss gradients has a negative inner product."""
    model = make_model()
    x, y = make_data()
    params = {name: p.detach() for name, p in model.named_parameters()}
    jacobians = jacrev(lambda p: losses_of(functional_call(model, p, (x,)), y))(params)
    matrix = torch.cat([j.reshape(M, -1) for j in jacobians.values()], dim=1)
    assert float((matrix @ matrix.T).min()) < 0


@ENTRIES
def test_jacobian_optimizer_step_matches_jacrev(entry: Entry):
    model = make_model()
    x, y = make_data()
    optimizer = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=LR), entry.make(M))

    def closure():
        optimizer.zero_grad()
        return losses_of(model(x), y)

    for _ in range(STEPS):
        optimizer.step(closure)
    assert_same_params(entry, list(model.parameters()), reference_params(entry))


@ENTRIES
def test_functional_api_step_matches_jacrev(entry: Entry):
    model = make_model()
    x, y = make_data()
    sgd = torch.optim.SGD(model.parameters(), lr=LR)
    aggregator = entry.make(M)
    for _ in range(STEPS):
        sgd.zero_grad()
        jdoptim.backward(losses_of(model(x), y))
        jdoptim.jac_to_grad(model.parameters(), aggregator)
        sgd.step()
    assert all(getattr(p, "jac", None) is None for p in model.parameters())
    assert_same_params(entry, list(model.parameters()), reference_params(entry))
