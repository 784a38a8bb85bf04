"""SDMGradWeighting against an independent float64 loop (bisection projection) and scipy's QP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jdoptim.aggregation._bases import GramianWeightedAggregator
from jdoptim.aggregation._sdmgrad import SDMGradWeighting
from tests.aggregation._simplex_reference import project_simplex_bisection, simplex_qp


def reference_sdmgrad(crosses, lr, momentum, n_iter, lam, omega):
    """The inner loop written from the paper, momentum as torch.optim.SGD (dampening 0)."""
    m = crosses[0].shape[0]
    w = np.full(m, 1.0 / m)
    outputs = []
    for c in crosses:
        scale = np.mean(np.sqrt(np.abs(np.diag(c)))) ** 2
        c = c / scale
        velocity = np.zeros(m)
        for _ in range(n_iter):
            velocity = momentum * velocity + c @ (w + lam * omega)
            w = project_simplex_bisection(w - lr * velocity)
        outputs.append((w + lam * omega) / (1 + lam))
    return outputs


@pytest.mark.parametrize("pref", [None, [0.1, 0.2, 0.3, 0.4, 0.0]])
def test_matches_reference_over_calls(pref):
    rng = np.random.default_rng(0)
    crosses = [rng.normal(size=(5, 9)) @ rng.normal(size=(5, 9)).T for _ in range(4)]
    omega = np.full(5, 0.2) if pref is None else np.array(pref)
    pref_vector = None if pref is None else torch.tensor(pref, dtype=torch.float64)
    weighting = SDMGradWeighting(
        lr=0.7, momentum=0.5, n_iter=7, lambda_=0.3, pref_vector=pref_vector
    )
    expected = reference_sdmgrad(crosses, 0.7, 0.5, 7, 0.3, omega)
    for c, e in zip(crosses, expected, strict=True):
        actual = weighting.weights_from_cross_gramian(torch.from_numpy(c))
        np.testing.assert_allclose(actual.numpy(), e, atol=1e-10)


def test_inner_loop_converges_to_the_direction_oriented_qp():
    rng = np.random.default_rng(1)
    J = rng.normal(size=(4, 6))
    G = J @ J.T
    lam = 0.5
    omega = np.full(4, 0.25)
    weighting = SDMGradWeighting(lr=0.05, momentum=0.0, n_iter=3000, lambda_=lam)
    weights = weighting(torch.from_numpy(G)).numpy()
    # w* = argmin_{w ∈ Δ} ½‖Jᵀ(w + λω)‖² (the scaling of G does not move the minimiser).
    w_star = simplex_qp(G, lam * G @ omega)
    np.testing.assert_allclose(weights, (w_star + lam * omega) / (1 + lam), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_positively_homogeneous_given_the_same_state(dtype):
    J = torch.randn(5, 8, dtype=dtype, generator=torch.Generator().manual_seed(0))
    expected = GramianWeightedAggregator(SDMGradWeighting())(J)
    tolerance = 1e-3 if dtype == torch.float32 else 1e-10  # 20 steps of lr=10 amplify rounding
    for s in [1e-6, 1e-3, 0.5, 3.0, 1e3, 1e6]:
        actual = GramianWeightedAggregator(SDMGradWeighting())(s * J)
        atol = tolerance * s * float(expected.abs().max())  # float32 Gramians round differently
        assert torch.allclose(actual, s * expected, rtol=0, atol=atol)


def test_state_round_trip_reset_and_strict_loading():
    rng = np.random.default_rng(2)
    crosses = [torch.from_numpy(rng.normal(size=(3, 3))) for _ in range(6)]
    first = SDMGradWeighting()
    for c in crosses[:3]:
        first(c)
    fresh = SDMGradWeighting()
    fresh.set_extra_state(first.get_extra_state())
    for c in crosses[3:]:
        assert torch.equal(first(c), fresh(c))
    first.reset()
    assert first.get_extra_state() == {"lambda": None}
    assert torch.equal(first(crosses[0]), SDMGradWeighting()(crosses[0]))
    with pytest.raises(KeyError, match="unexpected keys"):
        fresh.set_extra_state({"lambda": None, "w": None})


def test_cross_gramian_with_zero_diagonal_and_zero_matrix():
    cross = torch.tensor([[0.0, 2.0], [-1.0, 0.0]], dtype=torch.float64)
    assert bool(torch.isfinite(SDMGradWeighting()(cross)).all())
    assert torch.allclose(SDMGradWeighting()(torch.zeros(3, 3)), torch.full((3,), 1 / 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "J",
    [
        torch.zeros(5, 4),
        torch.ones(5, 4),
        torch.randn(5, 1) @ torch.randn(1, 6),
        torch.randn(1, 3),
        torch.randn(256, 30),
        torch.randn(6, 3) * 1e-8,
        torch.randn(6, 3) * 1e8,
        torch.zeros(5, 0),
    ],
    ids=["zero", "duplicated", "rank1", "one-row", "m256", "tiny", "huge", "no-columns"],
)
def test_finite_weights_summing_to_one(J, dtype):
    J = J.to(dtype)
    aggregator = GramianWeightedAggregator(SDMGradWeighting())
    weights = aggregator.weights(J)
    update = aggregator(J)
    assert weights.dtype == dtype and update.shape == (J.shape[1],)
    assert bool(torch.isfinite(update).all()) and bool((weights >= 0).all())
    assert abs(float(weights.double().sum()) - 1.0) < 1e-5


def test_pref_vector_length_must_match():
    with pytest.raises(ValueError, match="pref_vector has 2 entries but the matrix has 3 rows"):
        SDMGradWeighting(pref_vector=torch.tensor([0.5, 0.5]))(torch.eye(3))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"lr": 0.0}, ValueError),
        ({"lr": -1.0}, ValueError),
        ({"momentum": 1.0}, ValueError),
        ({"momentum": -0.1}, ValueError),
        ({"n_iter": 0}, ValueError),
        ({"n_iter": 2.0}, ValueError),
        ({"lambda_": -0.3}, ValueError),
        ({"lambda_": float("nan")}, ValueError),
        ({"lr": "10"}, TypeError),
        ({"pref_vector": [0.5, 0.5]}, TypeError),
    ],
)
def test_bad_constructor_arguments(kwargs, error):
    with pytest.raises(error):
        SDMGradWeighting(**kwargs)


def test_repr():
    assert repr(SDMGradWeighting()) == (
        "SDMGradWeighting(lr=10.0, momentum=0.5, n_iter=20, lambda_=0.3, pref_vector=None)"
    )
