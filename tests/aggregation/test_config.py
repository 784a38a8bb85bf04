"""ConFIG against the paper's pseudo-inverse formula in float64 numpy, and its claims.

Liu, Chu & Thuerey 2024 (arXiv 2408.11104): with the unit gradients ``ĝ_i = g_i / ‖g_i‖`` stacked
in ``Ĵ``, ``g_v = Ĵ⁺ p`` (``p = 1`` by default), ``g_u = g_v / ‖g_v‖`` and the update
``(Σ_i ⟨g_i, g_u⟩) g_u``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jdoptim.aggregation import ConFIG
from jdoptim.aggregation._config import ConFIGWeighting
from tests.aggregation import _inputs


def paper_config(
    matrix: np.ndarray, pref: np.ndarray | None = None, rcond: float = 1e-10
) -> np.ndarray:
    """The paper's formula with ``numpy.linalg.pinv`` (zero rows left out of ``Ĵ``)."""
    m, n = matrix.shape
    pref = np.ones(m) if pref is None else pref
    norms = np.linalg.norm(matrix, axis=1)
    keep = norms > 0
    units = matrix[keep] / norms[keep, None]
    g_v = np.linalg.pinv(units, rcond=rcond) @ pref[keep]
    if np.linalg.norm(g_v) == 0:
        return np.zeros(n)
    g_u = g_v / np.linalg.norm(g_v)
    return (matrix @ g_u).sum() * g_u


CASES = {
    "two-rows": _inputs.random(2, 4, 0),
    "random": _inputs.random(3, 5, 1),
    "conflicting": _inputs.conflicting(4, 6, 2),
    "square": _inputs.random(5, 5, 3),
    "rank-deficient": _inputs.rank_deficient(5, 4, 2, 4),
    "duplicated": _inputs.duplicated(6, 4, 5),
    "more-rows-than-columns": _inputs.random(6, 3, 6),
    "zero-row": np.concatenate([_inputs.random(3, 5, 7), np.zeros((1, 5))]),
    "different-norms": _inputs.random(4, 6, 8) * np.array([[1e-3], [1.0], [30.0], [2.0]]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_paper_formula(case: str):
    matrix = CASES[case]
    expected = paper_config(matrix)
    update = ConFIG()(torch.from_numpy(matrix)).numpy()
    np.testing.assert_allclose(update, expected, rtol=0, atol=1e-10 * np.abs(expected).max())


@pytest.mark.parametrize("case", ["random", "conflicting", "rank-deficient", "zero-row"])
def test_matches_the_paper_formula_with_a_preference(case: str):
    matrix = CASES[case]
    pref = np.arange(1.0, matrix.shape[0] + 1)
    expected = paper_config(matrix, pref)
    update = ConFIG(torch.from_numpy(pref))(torch.from_numpy(matrix)).numpy()
    np.testing.assert_allclose(update, expected, rtol=0, atol=1e-10 * np.abs(expected).max())
    # only the direction of p matters
    scaled = ConFIG(torch.from_numpy(7.5 * pref))(torch.from_numpy(matrix)).numpy()
    np.testing.assert_allclose(scaled, update, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["two-rows", "random", "square", "different-norms"])
def test_equal_cosines_and_no_conflict_for_independent_rows(case: str, dtype: torch.dtype):
    """Independent rows: ``⟨ĝ_i, d⟩`` is the same positive number for every ``i``."""
    matrix = CASES[case]
    update = ConFIG()(torch.from_numpy(matrix).to(dtype)).double().numpy()
    units = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    cosines = units @ update / np.linalg.norm(update)
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(cosines, cosines.mean(), rtol=rtol)
    assert cosines.min() > 0


def test_float32_matches_float64_on_nearly_dependent_unit_rows():
    """``σ_min / σ_max ≈ 4.6e-3`` (below ``eps32^(1/4)``): the float32 matrix's Gramian is formed in
    float64 (``jdoptim.linalg.gramian``), so the direction is kept (on main, the float32 Gramian's
    cutoff dropped it: 7% away from the float64 answer)."""
    matrix = CASES["conflicting"]
    units = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    singular = np.linalg.svd(units, compute_uv=False)
    eps32 = float(torch.finfo(torch.float32).eps)
    assert singular[-1] / singular[0] < eps32**0.25 < singular[-2] / singular[0]
    update64 = ConFIG()(torch.from_numpy(matrix)).numpy()
    cosines = units @ update64
    np.testing.assert_allclose(cosines, cosines.mean(), rtol=1e-10)
    update32 = ConFIG()(torch.from_numpy(matrix).float()).double().numpy()
    np.testing.assert_allclose(update32, update64, rtol=0, atol=1e-4 * np.abs(update64).max())


def test_length_is_the_sum_of_projections():
    matrix = CASES["conflicting"]
    update = ConFIG()(torch.from_numpy(matrix)).numpy()
    direction = update / np.linalg.norm(update)
    np.testing.assert_allclose(np.linalg.norm(update), (matrix @ direction).sum(), rtol=1e-12)


def test_direction_ignores_row_norms():
    """Scaling one row by ``s > 0`` leaves ``g_u`` (built from unit rows) unchanged."""
    matrix = CASES["conflicting"]
    scaled = matrix * np.array([[3.0], [1.0], [0.01], [1.0]])
    u1 = ConFIG()(torch.from_numpy(matrix)).numpy()
    u2 = ConFIG()(torch.from_numpy(scaled)).numpy()
    np.testing.assert_allclose(u1 / np.linalg.norm(u1), u2 / np.linalg.norm(u2), atol=1e-12)


def test_may_conflict_with_more_rows_than_columns():
    """The docstring claims no conflict only for independent unit rows: here it does conflict."""
    rows = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -0.5]])
    update = ConFIG()(torch.from_numpy(rows)).numpy()
    np.testing.assert_allclose(update, paper_config(rows), atol=1e-12)
    assert (rows @ update).min() < 0


def test_opposite_rows_give_zero():
    """``p = 1`` is orthogonal to the range of ``Ĝ``: ``g_v = 0``."""
    rows = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 6.0, -1.5]], dtype=torch.float64)
    assert torch.equal(ConFIG()(rows), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(ConFIG()(torch.zeros(3, 4)), torch.zeros(4))


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 2.5, 1e3, 1e6])
def test_positively_homogeneous(scale):
    matrix = torch.from_numpy(CASES["conflicting"])
    for aggregator in [ConFIG(), ConFIG(torch.tensor([1.0, 2.0, 3.0, 4.0]))]:
        torch.testing.assert_close(
            aggregator(matrix * scale) / scale, aggregator(matrix), rtol=1e-10, atol=1e-12
        )


def test_permutation_invariant_and_preference_follows_rows():
    matrix = torch.from_numpy(CASES["rank-deficient"])
    permutation = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(ConFIG()(matrix[permutation]), ConFIG()(matrix))
    pref = torch.arange(1.0, 6.0, dtype=torch.float64)
    torch.testing.assert_close(ConFIG(pref[permutation])(matrix[permutation]), ConFIG(pref)(matrix))


def test_weights_give_the_update():
    matrix = torch.from_numpy(CASES["conflicting"])
    weights = ConFIGWeighting()(matrix @ matrix.T)
    torch.testing.assert_close(weights @ matrix, ConFIG()(matrix), rtol=1e-12, atol=1e-12)


def test_stateless_and_repr():
    aggregator = ConFIG()
    assert aggregator.state_dict() == {}
    aggregator.reset()
    assert repr(aggregator).startswith("ConFIG(")


@pytest.mark.parametrize(
    ("pref", "error"),
    [
        ([1.0, 2.0], TypeError),
        (torch.tensor([[1.0, 2.0]]), ValueError),
        (torch.tensor([1.0, float("nan")]), ValueError),
    ],
)
def test_bad_preference(pref, error):
    with pytest.raises(error, match="pref_vector"):
        ConFIG(pref)


def test_preference_of_the_wrong_length():
    with pytest.raises(ValueError, match="pref_vector"):
        ConFIG(torch.tensor([1.0, 2.0]))(torch.ones(3, 4))


@pytest.mark.parametrize("spread", [0.05, 0.01])
def test_float32_on_32_near_parallel_rows(spread: float):
    """Issue 14: 32 near-parallel rows of different norms (unit rows' condition number 300 to
    1700). The float32 update is within 1e-5 of the paper's formula in float64 (on main it
    was 7% away: the float32 Gramian's cutoff dropped the small singular values; the peer's float32
    was measured 2e-5 to 2e-4 away)."""
    rng = np.random.default_rng(0)
    v = rng.normal(size=64)
    matrix = v + spread * np.linalg.norm(v) / 8 * rng.normal(size=(32, 64))
    matrix *= rng.uniform(0.5, 2.0, size=(32, 1))
    expected = paper_config(matrix)
    update = ConFIG()(torch.from_numpy(matrix).float()).double().numpy()
    assert np.linalg.norm(update - expected) <= 1e-5 * np.linalg.norm(expected)
