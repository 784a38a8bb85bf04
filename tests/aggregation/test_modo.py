"""MoDoWeighting against an independent float64 loop (bisection projection) and scipy's QP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jdoptim.aggregation._bases import GramianWeightedAggregator
from jdoptim.aggregation._modo import MoDoWeighting
from tests.aggregation._simplex_reference import project_simplex_bisection, simplex_qp


def reference_modo(crosses: list[np.ndarray], gamma: float, rho: float) -> list[np.ndarray]:
    lam = np.full(crosses[0].shape[0], 1.0 / crosses[0].shape[0])
    out = []
    for c in crosses:
        lam = project_simplex_bisection(lam - gamma * (c @ lam + rho * lam))
        out.append(lam)
    return out


def test_matches_reference_over_calls_with_cross_gramians():
    rng = np.random.default_rng(0)
    crosses = [rng.normal(size=(5, 12)) @ rng.normal(size=(5, 12)).T * 0.1 for _ in range(6)]
    weighting = MoDoWeighting(gamma=0.3, rho=0.2)
    expected = reference_modo(crosses, 0.3, 0.2)
    for c, e in zip(crosses, expected, strict=True):
        actual = weighting.weights_from_cross_gramian(torch.from_numpy(c))
        np.testing.assert_allclose(actual.numpy(), e, atol=1e-12)


def test_calling_on_a_gramian_is_the_one_batch_case():
    J = torch.randn(4, 7, dtype=torch.float64)
    a, b = MoDoWeighting(0.05, 0.1), MoDoWeighting(0.05, 0.1)
    for _ in range(3):
        assert torch.equal(a(J @ J.T), b.weights_from_cross_gramian(J @ J.T))


def test_converges_to_the_regularised_min_norm_weights():
    rng = np.random.default_rng(1)
    J = rng.normal(size=(4, 6))
    G = J @ J.T
    rho = 0.1
    weighting = MoDoWeighting(gamma=0.5 / np.linalg.norm(G + rho * np.eye(4), 2), rho=rho)
    for _ in range(3000):
        weights = weighting(torch.from_numpy(G))
    expected = simplex_qp(G + rho * np.eye(4), np.zeros(4))
    np.testing.assert_allclose(weights.numpy(), expected, atol=1e-6)


def test_state_round_trip_reset_and_strict_loading():
    rng = np.random.default_rng(2)
    crosses = [torch.from_numpy(rng.normal(size=(3, 3))) for _ in range(6)]
    first = MoDoWeighting(0.2, 0.1)
    assert first.get_extra_state() == {"lambda": None}
    for c in crosses[:3]:
        first(c)
    fresh = MoDoWeighting(0.2, 0.1)
    fresh.set_extra_state(first.get_extra_state())
    for c in crosses[3:]:
        assert torch.equal(first(c), fresh(c))
    first.reset()
    assert first.get_extra_state() == {"lambda": None}
    assert torch.equal(first(crosses[0]), MoDoWeighting(0.2, 0.1)(crosses[0]))
    with pytest.raises(KeyError, match="missing keys"):
        fresh.set_extra_state({})
    with pytest.raises(ValueError):
        fresh.set_extra_state({"lambda": torch.zeros(2, 2)})


def test_a_change_of_m_restarts_from_uniform():
    weighting = MoDoWeighting()
    weighting(torch.eye(3))
    assert torch.equal(weighting(torch.eye(2)), MoDoWeighting()(torch.eye(2)))


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
def test_on_the_simplex_for_every_input(J, dtype):
    J = J.to(dtype)
    aggregator = GramianWeightedAggregator(MoDoWeighting())
    for _ in range(2):
        weights = aggregator.weights(J)
        update = aggregator(J)
        assert weights.dtype == dtype and update.shape == (J.shape[1],)
        assert bool(torch.isfinite(update).all()) and bool((weights >= 0).all())
        assert abs(float(weights.double().sum()) - 1.0) < 1e-5


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"gamma": 0.0}, ValueError),
        ({"gamma": float("inf")}, ValueError),
        ({"rho": -1.0}, ValueError),
        ({"gamma": "0.1"}, ValueError),
    ],
)
def test_bad_constructor_arguments(kwargs, error):
    with pytest.raises(error):
        MoDoWeighting(**kwargs)


def test_bad_inputs_and_repr():
    with pytest.raises(ValueError, match="square"):
        MoDoWeighting()(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="at least one row"):
        MoDoWeighting()(torch.zeros(0, 0))
    assert repr(MoDoWeighting(0.5, 0.0)) == "MoDoWeighting(gamma=0.5, rho=0.0)"
