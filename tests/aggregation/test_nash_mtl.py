"""NashMTL against scipy on the bargaining problem, its clipping, schedule and state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from jdoptim.aggregation._nash_mtl import NashMTL, NashMTLWeighting
from tests.aggregation._inputs import random


def nash_direction(matrix: np.ndarray, radius: float) -> np.ndarray:
    """``argmax Σ log(g_iᵀ d)`` s.t. ``‖d‖ <= radius``, by SLSQP (the bargaining problem)."""
    start = matrix.mean(axis=0)
    start *= 0.5 * radius / np.linalg.norm(start)
    result = minimize(
        lambda d: -np.log(np.maximum(matrix @ d, 1e-300)).sum(),
        start,
        jac=lambda d: -(matrix / (matrix @ d)[:, None]).sum(axis=0),
        constraints=[{"type": "ineq", "fun": lambda d: radius**2 - d @ d}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return result.x


@pytest.mark.parametrize(("m", "seed"), [(2, 0), (3, 1), (5, 2), (8, 3)])
def test_direction_is_the_nash_bargaining_solution(m, seed):
    matrix = random(m, 9, seed) + 1.0
    update = NashMTL(m, max_norm=0.0)(torch.from_numpy(matrix)).numpy()
    expected = nash_direction(matrix, float(np.linalg.norm(update)))
    np.testing.assert_allclose(update, expected, rtol=1e-5, atol=1e-5 * np.abs(update).max())


def test_weights_solve_the_normalised_equation():
    matrix = random(6, 10, 4) + 0.8
    gramian = matrix @ matrix.T
    weights = NashMTLWeighting(6, max_norm=0.0)(torch.from_numpy(gramian)).numpy()
    normalised = gramian / np.linalg.norm(gramian)
    np.testing.assert_allclose(weights * (normalised @ weights), np.ones(6), rtol=1e-10)


def test_max_norm_clips_the_update():
    matrix = torch.from_numpy(random(3, 5, 5) + 1.0) * 100
    free = NashMTL(3, max_norm=0.0)(matrix)
    clipped = NashMTL(3, max_norm=2.0)(matrix)
    torch.testing.assert_close(clipped, free * 2.0 / free.norm())
    small = NashMTL(3, max_norm=1e9)(matrix)
    torch.testing.assert_close(small, free)


def test_update_weights_every_reuses_the_weights():
    first, second = (torch.from_numpy(random(3, 5, s) + 1.0) for s in (6, 7))
    weighting = NashMTLWeighting(3, max_norm=0.0, update_weights_every=2)
    w1 = weighting(first @ first.T)
    assert torch.equal(weighting(second @ second.T), w1)  # call 2: reused
    fresh = NashMTLWeighting(3, max_norm=0.0)
    torch.testing.assert_close(weighting(second @ second.T), fresh(second @ second.T))  # call 3


def test_state_round_trip_and_reset():
    grams = [torch.from_numpy((j := random(4, 6, s) + 1.0) @ j.T) for s in range(6)]
    first = NashMTLWeighting(4, update_weights_every=2, optim_niter=3)
    for g in grams[:3]:
        first(g)
    fresh = NashMTLWeighting(4, update_weights_every=2, optim_niter=3)
    fresh.load_state_dict(first.state_dict())
    for g in grams[3:]:
        assert torch.equal(first(g), fresh(g))
    first.reset()
    assert first.state_dict()["step"] == 0
    assert torch.equal(first.state_dict()["weights"], torch.ones(4, dtype=torch.float64))
    with pytest.raises(KeyError):
        fresh.load_state_dict({"step": 0})
    with pytest.raises(ValueError):
        fresh.load_state_dict({"step": 0, "weights": torch.ones(3)})


def test_wrong_number_of_rows():
    with pytest.raises(ValueError, match="n_tasks=3, got 2 rows"):
        NashMTL(3)(torch.eye(2))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"n_tasks": 0}, ValueError),
        ({"n_tasks": 2.0}, TypeError),
        ({"n_tasks": 2, "max_norm": -1.0}, ValueError),
        ({"n_tasks": 2, "max_norm": float("nan")}, ValueError),
        ({"n_tasks": 2, "update_weights_every": 0}, ValueError),
        ({"n_tasks": 2, "optim_niter": 0}, ValueError),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        NashMTL(**kwargs)


def _rank_two(seed: int) -> np.ndarray:
    """8 positive combinations of 2 vectors in R^20: rank 2, 0 outside the hull."""
    rng = np.random.default_rng(seed)
    return np.abs(rng.normal(size=(8, 2))) @ rng.normal(size=(2, 20))


def _near_parallel(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=20) + 0.01 * rng.normal(size=(8, 20))


@pytest.mark.parametrize("family", [_rank_two, _near_parallel], ids=["rank-2", "near-parallel"])
@pytest.mark.parametrize("seed", range(3))
def test_nash_condition_on_rank_deficient_and_near_parallel_rows(family, seed):
    """Issue 14 measured the peer 0.55 (relative) away from us on such matrices. The paper's
    Theorem 3.1 characterises the bargaining solution by ``α_i (Gα)_i = 1`` (here with
    ``Ĝ = G/‖G‖_F``), and the direction by ``argmax Σ log(g_iᵀd)`` on a ball (scipy, independent):
    ours satisfies both, so the difference is the peer's (an approximate sequence of convex
    programs stopped after a fixed number of iterations)."""
    matrix = family(seed)
    gramian = matrix @ matrix.T
    weights = NashMTLWeighting(8, max_norm=0.0)(torch.from_numpy(gramian)).numpy()
    normalised = gramian / np.linalg.norm(gramian)
    np.testing.assert_allclose(weights * (normalised @ weights), np.ones(8), atol=1e-9)
    update = weights @ matrix
    expected = nash_direction(matrix, float(np.linalg.norm(update)))
    assert np.linalg.norm(update - expected) <= 1e-4 * np.linalg.norm(update)
