"""The step record of the weigh stage: what per-step diagnostics read.

``opt._path.record`` holds, after each step that weighed, this rank's losses and the global
Gramian and weights the aggregator saw. Checked against ``torch.func.jacrev`` on digits.
"""

from __future__ import annotations

import pytest
import torch

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import TrimmedMean, UPGrad
from tests.test_optimizer_params import ROUTES, _backward, _digits, _losses, _Net
from tests.test_optimizer_params import _reference_jacobian as _jacobian


@pytest.mark.parametrize("route", ROUTES)
def test_the_record_holds_the_global_gramian_and_the_weights_of_the_update(route):
    kwargs, split = ROUTES[route]
    model = _Net()
    x, y = _digits(10, seed=4)
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), **kwargs)
    assert opt._path.record is None
    _backward(opt, model, x, y, split)
    record = opt._path.record
    jacobian = _jacobian(model, x, y)
    assert record.m == 10
    assert record.route == {"samples": "samples", "layers": "layers"}.get(
        route.removeprefix("accumulated_"), "jacobian"
    )
    torch.testing.assert_close(record.gramian, jacobian @ jacobian.T, rtol=1e-9, atol=1e-12)
    update = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(record.weights @ jacobian, update, rtol=1e-9, atol=1e-12)
    last = x[5:] if split else x
    torch.testing.assert_close(record.losses, _losses(model, last, y[-len(last) :]).detach())


def test_an_aggregator_of_the_matrix_leaves_no_gramian_or_weights():
    model = _Net()
    x, y = _digits(6, seed=5)
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), TrimmedMean(1))
    opt.backward(_losses(model, x, y))
    record = opt._path.record
    assert (record.m, record.gramian, record.weights, record.update_products) == (6,) + (None,) * 3


@pytest.mark.parametrize(
    "route, aggregator",
    [
        (r, a)
        for r in ROUTES
        for a in ("upgrad", "trimmed_mean")
        if (r, a) != ("layers", "trimmed_mean")
    ],
)
def test_an_observed_step_records_the_update_products(route, aggregator):
    kwargs, split = ROUTES[route]
    model = _Net()
    x, y = _digits(10, seed=7)
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        UPGrad() if aggregator == "upgrad" else TrimmedMean(2),
        **kwargs,
    )
    opt._path.observe = True
    _backward(opt, model, x, y, split)
    record = opt._path.record
    jacobian = _jacobian(model, x, y)
    update = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(record.gramian, jacobian @ jacobian.T, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(record.update_products, jacobian @ update, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("route", ["jacobian", "samples"])
def test_a_step_skipped_on_overflow_keeps_the_previous_record(route):
    model = _Net(torch.float32)
    x, y = _digits(6, seed=6)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        UPGrad(),
        grad_scaler=scaler,
        **ROUTES[route][0],
    )
    opt.backward(scaler.scale(_losses(model, x, y)))
    good = opt._path.record
    opt.zero_grad()
    opt.backward(scaler.scale(_losses(model, x, y)) * float("inf"))
    assert all(not p.grad.isfinite().any() for p in model.parameters())  # the scaler skips
    assert opt._path.record is good
