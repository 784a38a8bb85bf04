"""IMTL-G against the paper's closed form and the equal-projection property."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jdoptim.aggregation._imtl_g import IMTLG, IMTLGWeighting
from tests.aggregation._inputs import duplicated, random


def paper_closed_form(matrix: np.ndarray) -> np.ndarray:
    """``α_{2:m} = g_1 Uᵀ (D Uᵀ)^{-1}``, ``α_1 = 1 - Σ α_{2:m}``, update ``Σ α_i g_i``."""
    units = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    d = matrix[0] - matrix[1:]
    u = units[0] - units[1:]
    alpha_rest = matrix[0] @ u.T @ np.linalg.inv(d @ u.T)
    alpha = np.concatenate([[1.0 - alpha_rest.sum()], alpha_rest])
    return alpha @ matrix


@pytest.mark.parametrize("shape", [(2, 3), (3, 5), (5, 8), (8, 8)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_paper_closed_form(shape, seed):
    matrix = random(*shape, seed) + 0.5  # independent rows with a common component
    update = IMTLG()(torch.from_numpy(matrix)).numpy()
    expected = paper_closed_form(matrix)
    np.testing.assert_allclose(update, expected, rtol=1e-8, atol=1e-8 * np.abs(expected).max())


def equal_projections(matrix: np.ndarray, update: np.ndarray) -> np.ndarray:
    return (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)) @ update


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equal_projections_with_duplicated_rows(dtype):
    """Dependent rows: the pseudo-inverse form still gives equal projections (d in range(G))."""
    matrix = duplicated(6, 4, 0) + 0.5
    update = IMTLG()(torch.from_numpy(matrix).to(dtype)).double().numpy()
    projections = equal_projections(matrix, update)
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(projections, projections.mean(), rtol=rtol)
    weights = IMTLGWeighting()(torch.from_numpy(matrix @ matrix.T).to(dtype))
    assert abs(float(weights.double().sum()) - 1.0) < 10 * rtol


def test_zero_row_gets_zero_weight():
    matrix = np.concatenate([random(3, 5, 1) + 0.5, np.zeros((1, 5))])
    weights = IMTLGWeighting()(torch.from_numpy(matrix @ matrix.T))
    assert float(weights[3]) == 0.0
    expected = paper_closed_form(matrix[:3])
    np.testing.assert_allclose((weights @ torch.from_numpy(matrix)).numpy(), expected, rtol=1e-9)


def test_degenerate_cases_give_zero():
    assert torch.equal(IMTLGWeighting()(torch.zeros(3, 3)), torch.zeros(3))
    opposite = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)
    # d = (‖g‖, ‖g‖) is orthogonal to range(G) = span((1, -1)): no update with Σw = 1 exists.
    assert torch.equal(IMTLG()(opposite), torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("scale", [1e-8, 1e-3, 1e5, 1e8])
def test_positively_homogeneous(scale):
    matrix = torch.from_numpy(random(4, 6, 3) + 0.5)
    torch.testing.assert_close(IMTLG()(matrix * scale) / scale, IMTLG()(matrix))


def test_permutation_invariant():
    matrix = torch.from_numpy(random(5, 6, 4) + 0.5)
    permutation = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(IMTLG()(matrix[permutation]), IMTLG()(matrix))
