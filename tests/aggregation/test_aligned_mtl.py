"""AlignedMTL against a numpy SVD of J (the paper's construction), and its edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jdoptim.aggregation._aligned_mtl import AlignedMTL, AlignedMTLWeighting
from tests.aggregation._inputs import duplicated, ill_conditioned, random, rank_deficient


def reference(matrix: np.ndarray, pref: np.ndarray, mode: str) -> np.ndarray:
    """The aligned rows ``σ V Uᵀ`` of the thin SVD ``J = V Σ Uᵀ``, weighted by ``p``."""
    v, s, ut = np.linalg.svd(matrix, full_matrices=False)
    keep = s > 1e-6 * s[0]  # the test matrices are exactly rank-deficient or well separated
    v, s, ut = v[:, keep], s[keep], ut[keep]
    sigma = {
        "min": s.min(),
        "median": np.sort(s)[(len(s) - 1) // 2],
        "rmse": np.sqrt(np.mean(s**2)),
    }[mode]
    aligned = sigma * v @ ut
    return pref @ aligned


MATRICES = {
    "random": random(4, 7, 0),
    "tall": random(7, 3, 1),
    "rank-deficient": rank_deficient(6, 5, 2, 2),
    "duplicated": duplicated(6, 4, 3),
    "ill-conditioned": ill_conditioned(5, 6, 1e3, 4),
}


@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("name", list(MATRICES))
@pytest.mark.parametrize("with_pref", [False, True])
def test_matches_the_svd_construction(name, mode, with_pref):
    matrix = MATRICES[name]
    m = matrix.shape[0]
    pref = np.arange(1.0, m + 1) / m if with_pref else np.full(m, 1.0 / m)
    pref_vector = torch.from_numpy(pref) if with_pref else None
    update = AlignedMTL(pref_vector, mode)(torch.from_numpy(matrix))
    expected = reference(matrix, pref, mode)
    np.testing.assert_allclose(update.numpy(), expected, atol=1e-9 * np.abs(matrix).max())


def test_aligned_rows_are_orthogonal_with_equal_norms():
    """With ``p = e_i`` the update is row ``i`` of ``Ĵ``: ``Ĵ Ĵᵀ = σ² I`` on a full-rank J."""
    matrix = torch.from_numpy(random(4, 9, 5))
    rows = torch.stack([AlignedMTL(torch.eye(4, dtype=torch.float64)[i])(matrix) for i in range(4)])
    sigma_min = torch.linalg.svdvals(matrix).min()
    torch.testing.assert_close(rows @ rows.T, sigma_min**2 * torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-8, 1e-3, 1e4, 1e8])
def test_weights_are_scale_invariant(dtype, scale):
    matrix = torch.from_numpy(rank_deficient(6, 5, 3, 6)).to(dtype)
    weighting = AlignedMTLWeighting(scale_mode="median")
    base = weighting(matrix @ matrix.T).double()
    scaled = (matrix * scale) @ (matrix * scale).T
    rtol = 1e-3 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(weighting(scaled).double(), base, rtol=rtol, atol=rtol)


def test_zero_gramian_and_one_row():
    assert torch.equal(AlignedMTLWeighting()(torch.zeros(3, 3)), torch.full((3,), 1 / 3))
    row = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(AlignedMTL()(row), row[0])  # σ = ‖g‖: the row itself


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"scale_mode": "max"}, ValueError),
        ({"pref_vector": [0.5, 0.5]}, TypeError),
        ({"pref_vector": torch.ones(2, 2)}, ValueError),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        AlignedMTL(**kwargs)


def test_pref_vector_length_mismatch():
    with pytest.raises(ValueError, match="3 entries but the matrix has 2 rows"):
        AlignedMTL(torch.ones(3, dtype=torch.float64))(torch.eye(2, dtype=torch.float64))
