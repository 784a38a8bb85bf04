"""CAGrad against its dual problem solved independently in float64 (scipy), and its claims.

Liu et al., NeurIPS 2021 (arXiv 2110.14048), Algorithm 1: with ``g_0`` the mean gradient and the
radius ``r = c ‖g_0‖``, the dual ``w* = argmin_{w ∈ Δ} g_wᵀ g_0 + r ‖g_w‖`` (``g_w = Jᵀw``) gives
the update ``d = g_0 + r g_w / ‖g_w‖``, which maximises ``min_i ⟨g_i, d⟩`` over the ball
``‖d - g_0‖ <= r``; the two optimal values are equal (strong duality).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize, minimize_scalar

from jdoptim.aggregation import CAGrad
from jdoptim.aggregation._cagrad import CAGradWeighting
from tests.aggregation import _inputs, _oracles


def dual_objective(matrix: np.ndarray, c: float):
    """``F(w) = g_wᵀ g_0 + c ‖g_0‖ ‖g_w‖`` as a function of ``w`` (float64)."""
    g0 = matrix.mean(axis=0)
    radius = c * np.linalg.norm(g0)
    gramian, alignments = matrix @ matrix.T, matrix @ g0
    return lambda w: float(w @ alignments + radius * np.sqrt(max(w @ gramian @ w, 0.0)))


def solve_dual(matrix: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    """``(w*, F(w*))`` by scipy: bounded scalar search for ``m = 2``, multi-start SLSQP else."""
    m = matrix.shape[0]
    objective = dual_objective(matrix, c)
    if m == 2:
        result = minimize_scalar(
            lambda a: objective(np.array([a, 1 - a])),
            bounds=(0.0, 1.0),
            method="bounded",
            options={"xatol": 1e-13},
        )
        w = np.array([result.x, 1 - result.x])
        return w, objective(w)
    starts = [np.full(m, 1.0 / m)] + [0.9 * np.eye(m)[i] + 0.1 / m for i in range(m)]
    best = None
    for start in starts:
        result = minimize(
            objective,
            start,
            bounds=[(0.0, 1.0)] * m,
            constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}],
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 2000},
        )
        if best is None or result.fun < best.fun:
            best = result
    return best.x, float(best.fun)


def paper_update(matrix: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    """``(g_0 + r g_w / ‖g_w‖, F(w*))`` from the independently solved dual."""
    w, value = solve_dual(matrix, c)
    g0, gw = matrix.mean(axis=0), w @ matrix
    return g0 + c * np.linalg.norm(g0) * gw / np.linalg.norm(gw), value


CASES = {
    "two-rows": _inputs.random(2, 5, 10),
    "two-conflicting": np.array([[1.0, 0.2, -0.5], [-0.8, 1.0, 0.3]]),
    "random": _inputs.random(3, 5, 0),
    "conflicting": _inputs.conflicting(4, 6, 1),
    "rank-deficient": _inputs.rank_deficient(5, 4, 2, 3),
    "more-rows-than-columns": _inputs.random(6, 3, 4),
}


@pytest.mark.parametrize("c", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_dual_solution(case: str, c: float):
    """The update equals ``g_0 + r g_w*/‖g_w*‖``, and its value ``min_i ⟨g_i, d⟩`` equals ``F(w*)``.

    Weak duality bounds every feasible ``d``: ``min_i ⟨g_i, d⟩ <= F(w)`` for every ``w`` in the
    simplex, so ours can be at most the scipy value (up to rounding), and strong duality makes it
    equal. The update itself is compared at the accuracy of SLSQP's ``w*``.
    """
    matrix = CASES[case]
    expected, value = paper_update(matrix, c)
    update = CAGrad(c)(torch.from_numpy(matrix)).numpy()
    g0 = matrix.mean(axis=0)
    scale = np.abs(matrix).max() ** 2
    assert np.linalg.norm(update - g0) <= c * np.linalg.norm(g0) * (1 + 1e-12)  # in the ball
    ours = float((matrix @ update).min())
    assert ours <= value + 1e-12 * scale  # weak duality
    assert ours >= value - 1e-9 * scale  # strong duality: optimal
    np.testing.assert_allclose(update, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_weights_are_the_dual_multipliers():
    """``w = 1/m + μ`` with ``μ = r w*/‖Jᵀw*‖`` (w* unique here: independent rows)."""
    matrix, c = _inputs.conflicting(3, 6, 2), 0.5
    w_star, _ = solve_dual(matrix, c)
    g0 = matrix.mean(axis=0)
    expected = 1 / 3 + c * np.linalg.norm(g0) * w_star / np.linalg.norm(w_star @ matrix)
    weights = CAGradWeighting(c)(torch.from_numpy(matrix @ matrix.T)).numpy()
    np.testing.assert_allclose(weights, expected, rtol=0, atol=1e-6)
    assert np.all(weights >= 1 / 3 - 1e-15)


def test_zero_in_the_hull_with_c_at_least_one_is_the_projection_of_g0():
    """``0 ∈ hull``: the optimal value is 0 (``d = 0`` is in the ball when ``c >= 1``); the
    docstring's choice, the optimal ``d`` nearest to ``g_0``, is the projection of ``g_0`` onto the
    dual cone ``{d : J d >= 0}`` (independent NNLS), provided it lies in the ball."""
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(3, 5)) + 1.0
    matrix = np.concatenate([rows, -0.5 * rows[:2].mean(axis=0, keepdims=True)])
    assert np.linalg.norm(_oracles.min_norm_in_hull(matrix)) < 1e-6  # 0 is in the hull
    g0 = matrix.mean(axis=0)
    projection = _oracles.project_nnls(matrix, g0)
    for c in [1.0, 1.5, 4.0]:
        assert np.linalg.norm(projection - g0) <= c * np.linalg.norm(g0)
        update = CAGrad(c)(torch.from_numpy(matrix)).numpy()
        np.testing.assert_allclose(update, projection, rtol=0, atol=1e-10)
        assert float((matrix @ update).min()) >= -1e-12


@pytest.mark.parametrize("seed", range(4))
def test_non_conflicting_when_c_at_least_one(seed):
    matrix = _inputs.conflicting(5, 4, seed)
    for c in [1.0, 2.0]:
        update = CAGrad(c)(torch.from_numpy(matrix)).numpy()
        assert float((matrix @ update).min()) >= -1e-12 * np.abs(matrix).max() ** 2


@pytest.mark.parametrize("c", [1.0, 2.0])
def test_zero_inside_the_hull_of_spanning_rows_gives_zero(c):
    """Regression: 5 rows spanning R⁴ with 0 strictly inside their hull, so ``{d : J d >= 0}`` is
    ``{0}`` and the only optimal ``d`` for ``c >= 1`` is 0. Rounding of the Gramian used to make
    ``{B y >= t > 0}`` look feasible: weights ~1e7, an update that conflicted by 3e-7."""
    matrix = _inputs.conflicting(5, 4, 1)
    hull = np.vstack([matrix.T, np.ones((1, 5))])
    weights_of_zero = np.linalg.lstsq(hull, np.r_[np.zeros(4), 1.0], rcond=None)[0]
    assert np.all(weights_of_zero > 0.05)  # unique hull weights of 0, all positive: interior
    aggregator = CAGrad(c)
    update = aggregator(torch.from_numpy(matrix)).numpy()
    assert np.abs(update).max() <= 1e-12 * np.abs(matrix).max()
    assert float(aggregator.weights(torch.from_numpy(matrix)).abs().max()) < 10.0


def test_can_conflict_when_c_below_one():
    """The docstring does not claim non-conflict for ``c < 1``: this input shows it."""
    matrix = _inputs.conflicting(4, 6, 1)
    update = CAGrad(0.5)(torch.from_numpy(matrix)).numpy()
    _, value = paper_update(matrix, 0.5)
    assert value < 0 and float((matrix @ update).min()) < 0


def test_c_zero_is_the_mean():
    matrix = torch.from_numpy(_inputs.conflicting(4, 6, 5))
    torch.testing.assert_close(CAGrad(0.0)(matrix), matrix.mean(dim=0), rtol=1e-14, atol=0)


def test_zero_mean_gradient_gives_zero():
    """``g_0 = 0``: the ball is the point 0, so ``d = 0`` whatever ``c``."""
    matrix = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 2.0, -0.5]], dtype=torch.float64)
    for c in [0.5, 1.0, 3.0]:
        assert torch.equal(CAGrad(c)(matrix), torch.zeros(3, dtype=torch.float64))


def test_norm_eps_is_relative():
    """``‖g_0‖ <= norm_eps · max_i ‖g_i‖`` gives the mean, at every scale."""
    g = np.array([1.0, 2.0, -1.0])
    matrix = np.stack([g, -g + 1e-6])  # ‖g_0‖ / ‖g_i‖ ≈ 3.5e-7
    for scale in [1e-8, 1.0, 1e8]:
        j = torch.from_numpy(matrix * scale)
        torch.testing.assert_close(CAGrad(0.5, norm_eps=1e-4)(j), j.mean(dim=0))
        # with norm_eps = 0 the ball is used: the update differs from the mean
        ball = CAGrad(0.5, norm_eps=0.0)(j)
        assert float((ball - j.mean(dim=0)).norm()) > 0.1 * float(j.mean(dim=0).norm())


@pytest.mark.parametrize("c", [0.4, 1.0])
@pytest.mark.parametrize("scale", [1e-6, 1e-3, 2.5, 1e3, 1e6])
def test_positively_homogeneous(c, scale):
    matrix = torch.from_numpy(_inputs.conflicting(5, 7, 6))
    torch.testing.assert_close(
        CAGrad(c)(matrix * scale) / scale, CAGrad(c)(matrix), rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize("c", [0.4, 1.0])
def test_permutation_invariant(c):
    matrix = torch.from_numpy(_inputs.conflicting(5, 7, 7))
    permutation = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(CAGrad(c)(matrix[permutation]), CAGrad(c)(matrix))


def test_float32_close_to_float64():
    matrix = _inputs.conflicting(4, 6, 8)
    expected = CAGrad(0.5)(torch.from_numpy(matrix))
    actual = CAGrad(0.5)(torch.from_numpy(matrix).float())
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-4)


def test_stateless_and_repr():
    aggregator = CAGrad(0.5, norm_eps=1e-3)
    assert aggregator.state_dict() == {}
    assert "c=0.5" in repr(aggregator) and "norm_eps=0.001" in repr(aggregator)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"c": -0.1}, ValueError, "c must be finite and >= 0"),
        ({"c": float("nan")}, ValueError, "c must be finite and >= 0"),
        ({"c": float("inf")}, ValueError, "c must be finite and >= 0"),
        ({"c": "0.5"}, TypeError, "c must be a number"),
        ({"c": True}, TypeError, "c must be a number"),
        ({"c": 0.5, "norm_eps": -1.0}, ValueError, "norm_eps must be finite and >= 0"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        CAGrad(**kwargs)


@pytest.mark.parametrize("c", [0.1, 0.5, 0.9, 1.0, 2.0])
@pytest.mark.parametrize("small", [1e-16, 1e-9, 1e-4])
def test_tiny_opposite_row(c, small):
    """Regression (raised TypeError): ``J = [[-δ], [1]]``. In one dimension the ball is
    ``[g_0 - r, g_0 + r]`` and ``min(-δd, d)`` is largest at the point of the ball nearest to 0:
    ``d = max(1 - c, 0) g_0`` with ``g_0 = (1 - δ)/2``, whatever the size of ``δ``."""
    matrix = torch.tensor([[-small], [1.0]], dtype=torch.float64)
    expected = max(1.0 - c, 0.0) * (1.0 - small) / 2
    update = CAGrad(c)(matrix)
    assert abs(float(update) - expected) <= 1e-12


def test_zero_in_hull_with_c_below_one_is_not_zero():
    """12 × 300, rows ``g_1 = g_0`` and ``g_2 = -g_0/2`` (``g_0`` the mean of all 12 rows, so 0 is
    in their hull) and 10 Gaussian rows, ``c = 0.5``.

    The paper's problem is ``max min_i ⟨g_i, d⟩`` over the ball ``‖d - g_0‖ <= c ‖g_0‖``: ``d = 0``
    is outside it for ``c < 1`` (``‖0 - g_0‖ = ‖g_0‖``), so an implementation that returns 0 when 0
    is in the hull (as the peer was measured to) does not solve it. Ours lies in the ball and
    reaches the dual optimum ``F(w*)`` (scipy, independent), which is negative here: every
    feasible ``d`` conflicts with ``g_1`` or ``g_2`` (``⟨g_1, d⟩ = -2⟨g_2, d⟩``, and
    ``⟨g_0, d⟩ >= (1 - c)‖g_0‖² > 0`` in the ball)."""
    rows = np.random.default_rng(11).normal(size=(10, 300))
    g0 = rows.sum(axis=0) / 11.5  # then the mean of [g0, -g0/2, rows] is g0
    matrix = np.vstack([g0, -0.5 * g0, rows])
    np.testing.assert_allclose(matrix.mean(axis=0), g0, atol=1e-14)
    c = 0.5
    radius = c * np.linalg.norm(g0)
    _, value = solve_dual(matrix, c)
    update = CAGrad(c)(torch.from_numpy(matrix)).numpy()
    assert np.linalg.norm(update - g0) <= radius * (1 + 1e-12)
    assert np.linalg.norm(update) >= (1 - c) * np.linalg.norm(g0) * (1 - 1e-12)  # not 0
    scale = np.linalg.norm(matrix, axis=1).max() ** 2
    assert abs(float((matrix @ update).min()) - value) <= 1e-9 * scale
    assert value < -0.01 * scale


@pytest.mark.parametrize("seed", range(5))
def test_hildreth_projection_matches_quadprog(seed):
    """The fallback projection onto ``{y : B y >= t}`` (``t < 0``: 0 is interior), against
    quadprog on well-conditioned instances, including duplicated and opposite unit rows."""
    import quadprog

    from jdoptim.aggregation._cagrad import _hildreth

    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(6, 4))
    rows = np.vstack([rows, rows[:1], -rows[1:2]])
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    y0 = 3.0 * rng.normal(size=4)
    bounds = -rng.uniform(0.1, 1.0, size=8)
    expected = quadprog.solve_qp(np.eye(4), y0, unit.T, bounds)[0]
    mu = _hildreth(unit, y0, bounds)
    assert np.all(mu >= 0.0)
    np.testing.assert_allclose(y0 + unit.T @ mu, expected, atol=1e-10)


@pytest.mark.parametrize("rank", [5, 19])
@pytest.mark.parametrize("strict", [True, False], ids=["strongly", "weakly"])
def test_c_one_on_float32_stationary_families(rank, strict):
    """Issue 14: CAGrad(c=1) conflicted by up to 0.18 R² on float32 stationary matrices (5.6e-3 R²
    on this weakly stationary rank-19 one after the float64 Gramian: NNLS multipliers of 1e5
    cancelling in Jᵀw). With 0 in the hull and c >= 1, d is the projection of g_0 onto the dual
    cone: compared with float64 NNLS on the float32 matrix, and non-conflicting up to rounding."""
    original = _inputs.stationary(20, 100, rank, 1, strict)
    j = torch.from_numpy(original).float()
    matrix = j.double().numpy()
    radius = np.linalg.norm(matrix, axis=1).max()
    # NNLS on the matrix before rounding: the float32 copy's own cone is ill-posed (see
    # test_projection_nnls.check_against_nnls).
    expected = _oracles.project_nnls(original, original.mean(axis=0))
    update = CAGrad(1.0)(j).double().numpy()
    assert np.linalg.norm(update - expected) <= 1e-4 * radius
    assert float((matrix @ update).min()) >= -100 * 100 * np.finfo(np.float32).eps * radius**2
