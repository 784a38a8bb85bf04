"""``jdoptim.autojac.jac_to_grad``: the update vs independent references, the weights, errors."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from jdoptim.aggregation import ExcessMTL, Krum, Mean, TrimmedMean, UPGrad
from jdoptim.autojac import backward, jac_to_grad
from tests._autojac_cases import LOSS_FAMILIES, digits_model
from tests._references import upgrad_reference


def _digits_jacobian(family: str, stage: str = "late"):
    model, x, y = digits_model(stage, torch.float64)
    backward(LOSS_FAMILIES[family](model(x), y))
    params = list(model.parameters())
    matrix = torch.cat([p.jac.flatten(1) for p in params], dim=1)
    return params, matrix


def _grad(params):
    return torch.cat([p.grad.flatten() for p in params])


@pytest.mark.parametrize("optimize", [False, True])
@pytest.mark.parametrize("stage", ["early", "late"])
@pytest.mark.parametrize("family", ["per-sample", "duplicated-and-zero", "rank-deficient"])
def test_upgrad_update_and_weights_match_an_independent_reference(family, stage, optimize):
    params, matrix = _digits_jacobian(family, stage)
    weights = jac_to_grad(params, UPGrad(), optimize_gramian_computation=optimize)
    got = _grad(params)
    torch.testing.assert_close(got, upgrad_reference(matrix), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(weights @ matrix, got)  # the update is Jᵀ w
    assert bool((matrix @ got >= -1e-9 * matrix.norm() ** 2).all())  # no loss increases
    assert all(not hasattr(p, "jac") for p in params)


def test_documented_example():
    param = torch.tensor([1.0, 2.0], requires_grad=True)
    backward([torch.tensor([-1.0, 1.0]) @ param, (param**2).sum()])
    weights = jac_to_grad([param], UPGrad())
    # rows (-1, 1) and (2, 4) do not conflict: UPGrad averages them
    torch.testing.assert_close(param.grad, torch.tensor([0.5, 2.5]))
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.5]))


def test_a_jacobian_weighted_aggregator_returns_its_weights():
    params, matrix = _digits_jacobian("per-sample")
    weights = jac_to_grad(params, ExcessMTL())
    torch.testing.assert_close(_grad(params), ExcessMTL()(matrix))  # a fresh, identical state
    torch.testing.assert_close(weights @ matrix, _grad(params))


def test_a_non_weighted_aggregator_returns_none():
    params, matrix = _digits_jacobian("per-sample")
    assert jac_to_grad(params, TrimmedMean(1), retain_jac=True) is None
    expected = stats.trim_mean(matrix.numpy(), 1 / matrix.shape[0], axis=0)
    torch.testing.assert_close(_grad(params), torch.from_numpy(expected))
    assert all(p.jac.shape[1:] == p.shape for p in params)  # retained


def test_a_plain_callable_accumulates_into_grad():
    w = torch.tensor([1.0, -1.0], requires_grad=True)
    w.grad = torch.ones(2)
    backward([w @ w, w.sum()])
    assert jac_to_grad([w], lambda m: m[0] - m[1]) is None
    torch.testing.assert_close(w.grad, torch.ones(2) + torch.tensor([1.0, -3.0]))


def _with_jacs():
    w = torch.ones(2, requires_grad=True)
    v = torch.ones(3, requires_grad=True)
    w.jac = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v.jac = torch.ones(2, 3)
    return w, v


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda w, v: jac_to_grad([w, v, torch.ones(1)], Mean()), ValueError, r"\[2\] hold no"),
        (lambda w, v: jac_to_grad([], Mean()), ValueError, "cannot be empty"),
        (lambda w, v: jac_to_grad([w, w], Mean()), ValueError, "same tensor"),
        (lambda w, v: jac_to_grad([w], "mean"), TypeError, "aggregator must be callable"),
        (lambda w, v: jac_to_grad([w, v], Krum(1)), ValueError, "Krum"),
        (lambda w, v: jac_to_grad([w], lambda m: m), ValueError, r"vector of shape \[2\]"),
    ],
)
def test_a_failing_call_writes_nothing(call, error, match):
    w, v = _with_jacs()
    with pytest.raises(error, match=match):
        call(w, v)
    assert w.grad is None and v.grad is None
    torch.testing.assert_close(w.jac, torch.eye(2))


def test_jac_shape_and_row_errors():
    w, v = _with_jacs()
    v.jac = torch.ones(3, 3)
    with pytest.raises(ValueError, match=r"different numbers of rows: \[2, 3\]"):
        jac_to_grad([w, v], Mean())
    v.jac = torch.ones(2, 2)
    with pytest.raises(ValueError, match=r"tensor 1 has shape \(3,\) but its \.jac has shape"):
        jac_to_grad([w, v], Mean())
    assert w.grad is None and v.grad is None


@pytest.mark.parametrize("make", [UPGrad, lambda: TrimmedMean(0)])
def test_jacobians_of_different_dtypes_are_aggregated_in_the_widest(make):
    a = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    b = torch.tensor([1.5, 0.25], dtype=torch.float64, requires_grad=True)
    backward([a.sum() + b.sum(), (a**2).sum() * b.prod().float()])
    matrix = torch.cat([a.jac.double(), b.jac], dim=1)
    expected = upgrad_reference(matrix) if isinstance(make(), UPGrad) else matrix.mean(0)
    jac_to_grad([a, b], make())
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float64
    torch.testing.assert_close(a.grad, expected[:3].float())
    torch.testing.assert_close(b.grad, expected[3:], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("optimize", [False, True])
@pytest.mark.parametrize("make", [UPGrad, ExcessMTL, lambda: TrimmedMean(0)])
def test_a_non_finite_jac_raises_and_writes_nothing(make, optimize):
    w, v = _with_jacs()
    v.jac = torch.tensor([[1.0, float("nan"), 0.0], [0.0, 1.0, 0.0]])
    with pytest.raises(ValueError, match="NaN or inf"):
        jac_to_grad([w, v], make(), optimize_gramian_computation=optimize)
    assert w.grad is None and v.grad is None
    torch.testing.assert_close(w.jac, torch.eye(2))
