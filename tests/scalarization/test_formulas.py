"""Each stateless scalarizer against its paper's formula and gradient, computed in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jdoptim.scalarization import COSMOS, PBI, STCH, Constant, GeometricMean, Mean, Random, Sum
from tests.scalarization._values import grad_of, leaf, positive_cases

CASES = positive_cases()
IDS = list(CASES)
VALUES = pytest.mark.parametrize("values", list(CASES.values()), ids=IDS)


def _check(scalarizer, values: np.ndarray, value: float, grad: np.ndarray, rtol=1e-12) -> None:
    out, g = grad_of(scalarizer, leaf(values))
    np.testing.assert_allclose(float(out), value, rtol=rtol, atol=0)
    np.testing.assert_allclose(g.numpy(), grad, rtol=rtol, atol=rtol * np.abs(grad).max())


@VALUES
def test_mean_sum_constant(values):
    m = values.size
    _check(Mean(), values, values.sum() / m, np.full(m, 1 / m))
    _check(Sum(), values, values.sum(), np.ones(m))
    w = np.linspace(-1.0, 2.0, m)
    _check(Constant(torch.tensor(w)), values, (w * values).sum(), w)


@VALUES
def test_geometric_mean(values):
    m = values.size
    gm = np.exp(np.log(values).mean())
    _check(GeometricMean(), values, gm, gm / (m * values), rtol=1e-10)


@VALUES
@pytest.mark.parametrize("mu", [1e-3, 0.1, 1.0])
def test_stch(values, mu):
    m = values.size
    rng = np.random.default_rng(m)
    lam, z = rng.dirichlet(np.ones(m)), rng.uniform(0, 0.1, size=m) * values.min()
    y = lam * (values - z) / mu
    top = y.max()
    value = mu * (top + np.log(np.exp(y - top).sum()))  # μ log Σ exp(y), stably
    soft = np.exp(y - top) / np.exp(y - top).sum()
    stch = STCH(mu, torch.tensor(lam), torch.tensor(z))
    _check(stch, values, value, lam * soft, rtol=1e-10)
    default = STCH(mu)
    yd = values / m / mu
    td = yd.max()
    _check(default, values, mu * (td + np.log(np.exp(yd - td).sum())), np.exp(yd - td) / m /
           np.exp(yd - td).sum(), rtol=1e-10)  # fmt: skip


@VALUES
@pytest.mark.parametrize("lam", [0.0, 0.5, 8.0])
def test_cosmos(values, lam):
    r = np.random.default_rng(values.size).dirichlet(np.ones(values.size))
    nr, nl = np.linalg.norm(r), np.linalg.norm(values)
    cos = r @ values / (nr * nl)
    grad = r - lam * (r / (nr * nl) - (r @ values) * values / (nr * nl**3))
    _check(COSMOS(lam, torch.tensor(r)), values, r @ values - lam * cos, grad, rtol=1e-10)


@VALUES
@pytest.mark.parametrize("theta", [0.0, 5.0])
def test_pbi(values, theta):
    rng = np.random.default_rng(values.size + 1)
    w, z = rng.dirichlet(np.ones(values.size)), -rng.uniform(size=values.size)
    f = values - z
    u = w / np.linalg.norm(w)
    d1 = f @ u
    perp = f - d1 * u
    d2 = np.linalg.norm(perp)
    grad = u + (theta * perp / d2 if d2 > 0 else 0.0)
    _check(PBI(theta, torch.tensor(w), torch.tensor(z)), values, d1 + theta * d2, grad, 1e-9)


def test_pbi_on_the_ray_is_exact_with_a_zero_subgradient():
    w = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    for scale in (1e-300, 1e-8, 1.0, 1e200):
        values = leaf((w * scale).numpy())
        out, grad = grad_of(PBI(5.0, w), values)
        assert float(out) == pytest.approx(3 * scale, rel=1e-15)  # d1 = ‖L‖, d2 = 0
        torch.testing.assert_close(grad, w / 3, rtol=1e-15, atol=0)


def test_cosmos_at_small_scales_is_scale_invariant_up_to_the_linear_term():
    r = torch.tensor([0.2, 0.8], dtype=torch.float64)
    base = torch.tensor([0.9, 0.1], dtype=torch.float64)
    reference = COSMOS(1.0, r)(base) - r @ base
    for scale in (1e-300, 1e-12, 1e-6):
        cosine_part = COSMOS(1.0, r)(base * scale) - r @ (base * scale)
        torch.testing.assert_close(cosine_part, reference, rtol=1e-12, atol=1e-15)
    assert float(COSMOS(1.0, r)(torch.zeros(2, dtype=torch.float64))) == 0.0


def test_random_draws_softmax_of_gaussians_from_its_own_generator():
    values = leaf(np.array([1.0, 2.0, 4.0, 8.0]))
    scalarizer = Random(seed=3)
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        weights = torch.softmax(torch.randn(4, generator=generator, dtype=torch.float64), dim=0)
        out, grad = grad_of(scalarizer, values)
        torch.testing.assert_close(grad, weights, rtol=1e-15, atol=0)
        torch.testing.assert_close(out, weights @ values.detach(), rtol=1e-15, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "scalarizer",
    [Mean(), Sum(), GeometricMean(), STCH(0.01), Random(seed=0)],
    ids=["Mean", "Sum", "GeometricMean", "STCH", "Random"],
)
def test_any_shape_and_dtype(scalarizer, dtype):
    values = torch.rand(2, 3, dtype=dtype) + 0.5
    out = scalarizer(values)
    assert out.shape == () and out.dtype == dtype and bool(torch.isfinite(out))
    flat = type(scalarizer)(**({"mu": 0.01} if isinstance(scalarizer, STCH) else {}))
    if not isinstance(scalarizer, Random):
        torch.testing.assert_close(out, flat(values.flatten()))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: Mean()([1.0, 2.0]), TypeError, "expected a tensor of values, got list"),
        (lambda: Sum()(torch.tensor([1, 2])), ValueError, "floating-point values"),
        (lambda: Mean()(torch.zeros(0)), ValueError, "at least one value"),
        (lambda: GeometricMean()(torch.tensor([1.0, -1.0])), ValueError, "non-negative"),
        (lambda: Constant(torch.ones(3))(torch.ones(2)), ValueError, r"weights has shape \(3,\)"),
        (lambda: Constant([1.0]), TypeError, "weights must be a Tensor"),
        (lambda: STCH(0.0), ValueError, "mu must be finite and > 0"),
        (lambda: STCH(1.0, reference=torch.ones(2))(torch.ones(3)), ValueError, "reference"),
        (lambda: COSMOS(-1.0, torch.ones(2)), ValueError, "lambda_ must be finite and >= 0"),
        (lambda: COSMOS(1.0, torch.zeros(2))(torch.ones(2)), ValueError, "non-zero preference"),
        (lambda: PBI(float("nan"), torch.ones(2)), ValueError, "theta must be finite"),
        (lambda: PBI(1.0, torch.tensor([1.0, float("inf")])), ValueError, "finite floating"),
    ],
)
def test_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_settings_validate_on_assignment():
    stch = STCH(0.5)
    with pytest.raises(ValueError, match="mu"):
        stch.mu = -1.0
    assert stch.mu == 0.5
    stch.weights = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(stch(torch.tensor([3.0, 1.0])), STCH(0.5, torch.tensor([1.0, 0.0]))(
        torch.tensor([3.0, 1.0])))  # fmt: skip
    assert stch.state_dict() == {}  # settings, not state
    assert stch.to(torch.float64).weights.dtype == torch.float64  # .to() moves the settings
