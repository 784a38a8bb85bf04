"""FairGrad against scipy (the published solver) and its fixed-point equation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares

from jdoptim.aggregation._fairgrad import FairGrad, FairGradWeighting
from tests.aggregation._inputs import random


def scipy_weights(gramian: np.ndarray, alpha: float) -> np.ndarray:
    """``G w - w^{-1/α} = 0`` by bounded least squares, as in the published implementation."""
    x0 = np.ones(gramian.shape[0]) / np.sqrt(np.diag(gramian).mean())
    result = least_squares(
        lambda w: gramian @ w - w ** (-1.0 / alpha),
        x0,
        bounds=(1e-12, np.inf),
        xtol=1e-15,
        ftol=1e-15,
        gtol=1e-15,
        max_nfev=10_000,
    )
    return result.x


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize(("m", "seed"), [(2, 0), (3, 1), (5, 2), (8, 3)])
def test_matches_scipy(alpha, m, seed):
    matrix = random(m, 10, seed) + 1.0  # a common direction: a solution exists
    gramian = matrix @ matrix.T
    weights = FairGradWeighting(alpha)(torch.from_numpy(gramian)).numpy()
    np.testing.assert_allclose(weights, scipy_weights(gramian, alpha), rtol=1e-6)
    # the fixed-point equation itself, independently of any solver
    np.testing.assert_allclose(gramian @ weights, weights ** (-1.0 / alpha), rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_scaling_law_and_non_conflict(dtype, alpha):
    """``A(sJ) = s^{(1-α)/(1+α)} A(J)``; ``J A(J) = w^{-1/α} > 0``."""
    matrix = torch.from_numpy(random(4, 6, 5) + 0.7)
    base = FairGrad(alpha)(matrix)
    assert bool((matrix @ base > 0).all())
    for s in [1e-6, 1e-2, 1e3, 1e6]:
        scaled = FairGrad(alpha)((matrix * s).to(dtype)).double()
        expected = s ** ((1 - alpha) / (1 + alpha)) * base
        rtol = 1e-4 if dtype == torch.float32 else 1e-9
        torch.testing.assert_close(
            scaled, expected, rtol=rtol, atol=rtol * float(expected.abs().max())
        )


def test_zero_rows_and_no_solution():
    # a zero row gets weight 0 and the others are solved alone
    matrix = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(
        FairGradWeighting(1.0)(matrix @ matrix.T), torch.tensor([0.5, 0.0, 1.0]).double()
    )
    # opposite rows: no direction improves both, the limit of the weights' path is d = 0
    opposite = torch.tensor([[1.0, 2.0], [-2.0, -4.0]], dtype=torch.float64)
    assert float(FairGrad(1.0)(opposite).abs().max()) <= 1e-12
    # rows (1, 0), (-1, 0), (0, 1): the blocking pair cancels, d is the Nash point of (0, 1)
    blocked = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(FairGrad(1.0)(blocked), torch.tensor([0.0, 1.0]).double())
    assert torch.equal(FairGrad(2.0)(torch.zeros(3, 4)), torch.zeros(4))


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((0.0,), ValueError),
        ((-1.0,), ValueError),
        ((float("inf"),), ValueError),
        (("1",), TypeError),
        ((1.0, 0), ValueError),
        ((1.0, 2.5), ValueError),
    ],
)
def test_bad_arguments(args, error):
    with pytest.raises(error):
        FairGrad(*args)


def test_rows_spread_over_four_decades():
    """Regression (found by the fuzzing): with row norms from 1e-2 to 40 the weights solved
    ``(G w)_i w_i = 1`` only to 4e-8 (relative) and a row permutation moved the update by 1e-6:
    rebuilding ``G`` from its eigendecomposition added ``eps · λ_max`` to the short rows' entries.
    """
    from tests.aggregation._inputs import conflicting, spread_rows

    matrix = spread_rows(conflicting(8, 10, 0), 4, 0)
    gramian = matrix @ matrix.T
    weights = FairGradWeighting(alpha=1.0)(torch.from_numpy(gramian)).numpy()
    np.testing.assert_allclose(weights * (gramian @ weights), np.ones(8), rtol=0, atol=1e-9)
    permutation = np.random.default_rng(0).permutation(8)
    update = FairGrad(alpha=1.0)(torch.from_numpy(matrix)).numpy()
    permuted = FairGrad(alpha=1.0)(torch.from_numpy(matrix[permutation])).numpy()
    assert np.linalg.norm(update - permuted) <= 1e-9 * np.linalg.norm(update)


@pytest.mark.parametrize("seed", [0, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_spread_over_12_decades_keep_their_equations(seed: int, dtype: torch.dtype):
    """Rows 1e12 apart in norm, 0 not in their hull: every row keeps ``g_iᵀd = 1/w_i > 0``.

    The rows' unit directions and the equation ``(G w)_i w_i = 1`` (α = 1) are invariant to the
    rows' norms, so the solution is that of the unit rows, ``w_i = v_i / ‖g_i‖``, checked against
    scipy's least squares on the unit rows. (The shortest rows used to be dropped as "numerically
    zero", and the update conflicted with them, cosine down to -0.99.)
    """
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(4, 6)) + 2.0 * rng.normal(size=6)  # a cone: 0 not in the hull
    unit = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    norms = np.array([1e6, 1.0, 1e-3, 1e-6])
    matrix = torch.from_numpy(unit * norms[:, None]).to(dtype)
    unit = unit.astype(np.float32).astype(np.float64) if dtype == torch.float32 else unit
    expected = scipy_weights(unit @ unit.T, 1.0) / np.linalg.norm(matrix.double().numpy(), axis=1)
    weights = FairGrad(alpha=1.0).weights(matrix).double().numpy()
    np.testing.assert_allclose(weights, expected, rtol=1e-6 if dtype == torch.float64 else 1e-3)
    alignment = matrix.double().numpy() @ FairGrad(alpha=1.0)(matrix).double().numpy()
    assert np.all(alignment > 0)
