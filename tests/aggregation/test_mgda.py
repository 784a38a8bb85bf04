"""MGDA against an independent min-norm-in-convex-hull computation (closed form, SLSQP)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jdoptim.aggregation import MGDA, MGDAWeighting
from tests.aggregation import _inputs, _oracles
from tests.aggregation._inputs import to_torch


def bound(epsilon: float, matrix: np.ndarray) -> float:
    """Distance to the min-norm point allowed by the stopping rule ``γ < ε``.

    At a Frank–Wolfe iterate ``d`` with vertex ``J_t``, ``‖d‖² - ⟨d, J_t⟩ < ε ‖d - J_t‖² <= 4ε R²``
    (``R = max_i ‖J_i‖``); this is the duality gap of ``½‖·‖²``, so ``½(‖d‖² - ‖d*‖²) < 4εR²``,
    and ``‖d - d*‖² <= ‖d‖² - ‖d*‖²`` because ``d*`` is the min-norm point of a convex set.
    """
    return float(np.sqrt(8 * epsilon)) * float(np.linalg.norm(matrix, axis=1).max())


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_two_rows_closed_form(seed, dtype):
    """m = 2: one exact line search reaches γ = clamp((g2 - g1)·g2 / ‖g1 - g2‖², 0, 1)."""
    matrix = _inputs.random(2, 1 + seed % 5, seed)
    if seed % 3 == 0:
        matrix[1] = -0.5 * matrix[0] + 0.1 * matrix[1]  # conflicting pair: interior γ
    j = to_torch(matrix, dtype)
    rounded = j.double().numpy()
    expected = _oracles.min_norm_in_hull(rounded)
    tol = 100 * torch.finfo(dtype).eps * np.linalg.norm(rounded, axis=1).max()
    assert np.abs(MGDA()(j).double().numpy() - expected).max() <= tol


@pytest.mark.parametrize("epsilon", [1e-3, 1e-6])
@pytest.mark.parametrize(
    "matrix",
    [
        _inputs.random(4, 6, 0),
        _inputs.conflicting(5, 4, 1),
        _inputs.rank_deficient(6, 5, 2, 2),
        _inputs.duplicated(6, 4, 3),
        _inputs.conflicting(12, 20, 4),
        _inputs.random(8, 3, 5),  # 0 in the hull (more rows than columns): d* = 0
    ],
    ids=["random", "conflicting", "rank-deficient", "duplicated", "conflicting-12", "zero-in-hull"],
)
def test_against_slsqp(matrix, epsilon):
    """Within the distance the stopping rule allows, and non-conflicting within its bound."""
    aggregator = MGDA(epsilon=epsilon, max_iters=100_000)
    update = aggregator(to_torch(matrix)).numpy()
    expected = _oracles.min_norm_in_hull(matrix)
    allowed = bound(epsilon, matrix)
    assert np.linalg.norm(update - expected) <= allowed
    radius = np.linalg.norm(matrix, axis=1).max()
    assert (matrix @ update).min() >= -4 * epsilon * radius**2
    weights = aggregator.gramian_weighting(to_torch(matrix @ matrix.T))
    assert bool((weights >= 0).all())
    assert abs(float(weights.sum()) - 1.0) <= 1e-12


def test_zero_when_zero_in_hull():
    """Rows g and -g: the midpoint 0 is in the hull, and the first iterate already is 0."""
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert torch.equal(MGDA()(torch.stack([g, -g])), torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("power", [-30, -3, 5, 30])
def test_weights_scale_invariant_bit_for_bit(power):
    """Scaling J by a power of two scales G exactly: the Frank–Wolfe weights are identical."""
    matrix = to_torch(_inputs.conflicting(6, 5, 7))
    weighting = MGDAWeighting()
    assert torch.equal(
        weighting(matrix @ matrix.T), weighting((matrix * 2.0**power) @ (matrix * 2.0**power).T)
    )


def test_max_iters_one_is_a_single_step():
    """One Frank–Wolfe step from the mean: the exact line search towards the best vertex."""
    matrix = _inputs.conflicting(4, 3, 8)
    gramian = matrix @ matrix.T
    w = np.full(4, 0.25)
    t = int(np.argmin(gramian @ w))
    d, vertex = w @ matrix, matrix[t]
    gamma = np.clip((d @ d - d @ vertex) / np.sum((d - vertex) ** 2), 0.0, 1.0)
    expected = (1 - gamma) * d + gamma * vertex
    update = MGDA(max_iters=1)(to_torch(matrix)).numpy()
    assert np.allclose(update, expected, rtol=0, atol=1e-12)
