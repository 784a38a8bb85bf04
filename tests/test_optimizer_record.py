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
    assert (record.m, record.gramian, record.weights) == (6, None, None)
