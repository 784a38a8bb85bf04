"""PCD against scipy on its quadratic program, its EMA normaliser and its state.

Varam & AlHajri 2026 (arXiv 2606.29521), Algorithm 1: ``d*`` is the projection of the normalised
primary gradient onto ``{d : g̃_jᵀd >= τ‖g̃_j‖²}``, the step is ``d*`` rescaled to ``‖g_1‖`` (the
raw primary gradient's norm), and ``g_1`` itself when the constraints are infeasible.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from jdoptim.aggregation._pcd import PCD, PCDWeighting
from tests.aggregation._inputs import random


def normalised(matrices: list[np.ndarray], beta: float) -> np.ndarray:
    """The last matrix with rows divided by the bias-corrected EMA of their squared norms."""
    ema = np.zeros(matrices[0].shape[0])
    for matrix in matrices:
        ema = beta * ema + (1 - beta) * (matrix**2).sum(axis=1)
    return matrices[-1] / np.sqrt(ema / (1 - beta ** len(matrices)))[:, None]


def scipy_direction(rows: np.ndarray, tau: float) -> np.ndarray:
    """``argmin ‖d - g̃_0‖²`` s.t. ``g̃_jᵀd >= τ‖g̃_j‖²`` by SLSQP."""
    constraints = [
        {"type": "ineq", "fun": lambda d, j=j: rows[j] @ d - tau * rows[j] @ rows[j]}
        for j in range(1, rows.shape[0])
    ]
    result = minimize(
        lambda d: ((d - rows[0]) ** 2).sum(),
        rows[0],
        jac=lambda d: 2 * (d - rows[0]),
        constraints=constraints,
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return result.x


def scipy_pcd(matrices: list[np.ndarray], tau: float, beta: float) -> np.ndarray:
    """The paper's step: the direction rescaled to the norm of the last primary gradient."""
    direction = scipy_direction(normalised(matrices, beta), tau)
    return direction * np.linalg.norm(matrices[-1][0]) / np.linalg.norm(direction)


@pytest.mark.parametrize("tau", [0.0, 0.02, 0.3, 1.0])
@pytest.mark.parametrize(("m", "seed"), [(2, 0), (3, 1), (5, 2), (6, 3)])
def test_matches_scipy_after_several_steps(tau, m, seed):
    matrices = [random(m, 8, seed + 10 * s) * (1 + s) for s in range(3)]
    aggregator = PCD(tau=tau, beta=0.9)
    for matrix in matrices:
        update = aggregator(torch.from_numpy(matrix)).numpy()
    expected = scipy_pcd(matrices, tau, 0.9)
    np.testing.assert_allclose(update, expected, atol=1e-6 * np.linalg.norm(expected))


def test_two_tasks_closed_form():
    g1, g2 = np.array([1.0, 0.5, 0.0]), np.array([-2.0, 0.0, 1.0])
    update = PCD(tau=0.3)(torch.tensor(np.stack([g1, g2]))).numpy()
    n1, n2 = g1 / np.linalg.norm(g1), g2 / np.linalg.norm(g2)  # first step: unit norms
    direction = n1 + (0.3 - n2 @ n1) * n2  # the paper's closed form for K = 2
    expected = np.linalg.norm(g1) * direction / np.linalg.norm(direction)
    np.testing.assert_allclose(update, expected, atol=1e-12)


@pytest.mark.parametrize("tau", [0.0, 0.5])
def test_infeasible_constraints_fall_back_to_the_primary_gradient(tau):
    """Opposite secondaries: ``g̃_2ᵀd >= τ`` and ``-g̃_2ᵀd >= τ`` cannot both hold for ``τ > 0``;
    the step is then ``g_1`` (it used to solve again with ``τ = 0``). With ``τ = 0`` the problem
    is feasible and the direction is the projection, rescaled to ``‖g_1‖``."""
    rows = np.array([[3.0, 1.0], [0.0, 1.0], [0.0, -1.0]])
    update = PCD(tau=tau)(torch.from_numpy(rows)).numpy()
    if tau > 0:
        np.testing.assert_allclose(update, rows[0], atol=1e-12)
    else:
        np.testing.assert_allclose(update, np.array([np.linalg.norm(rows[0]), 0.0]), atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scale_free_and_edge_cases(dtype):
    matrix = torch.from_numpy(random(4, 5, 7)).to(dtype)
    base = PCD()(matrix).double()
    for s in [1e-30, 1e-8, 1e8, 1e30]:  # positively homogeneous: direction scale-free, length ‖g_1‖
        torch.testing.assert_close(PCD()(matrix * s).double() / s, base, rtol=1e-5, atol=0)
    assert torch.equal(PCD()(torch.zeros(3, 4, dtype=dtype)), torch.zeros(4, dtype=dtype))
    one = torch.tensor([[3.0, 4.0]], dtype=dtype)
    torch.testing.assert_close(PCD()(one), one[0])
    zero_primary = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=dtype)  # ‖g_1‖ = 0: no step
    assert torch.equal(PCD()(zero_primary), torch.zeros(2, dtype=dtype))


def test_state_round_trip_reset_and_strict_loading():
    matrices = [torch.from_numpy(random(3, 4, s)) for s in range(6)]
    first = PCDWeighting(tau=0.1, beta=0.5)
    for matrix in matrices[:3]:
        first(matrix @ matrix.T)
    fresh = PCDWeighting(tau=0.1, beta=0.5)
    fresh.load_state_dict(first.state_dict())
    for matrix in matrices[3:]:
        assert torch.equal(first(matrix @ matrix.T), fresh(matrix @ matrix.T))
    first.reset()
    assert first.state_dict() == {"step": 0, "sq_norm_ema": None}
    with pytest.raises(KeyError):
        fresh.load_state_dict({"step": 1})
    with pytest.raises(ValueError, match="3 rows, got 2"):
        fresh(torch.eye(2, dtype=torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"tau": -0.1}, ValueError),
        ({"tau": 1.5}, ValueError),
        ({"beta": 1.0}, ValueError),
        ({"beta": "0.9"}, TypeError),
        ({"eps": 0.0}, ValueError),
        ({"eps": float("nan")}, ValueError),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        PCD(**kwargs)
