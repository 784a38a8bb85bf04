"""Exactness of the dual-cone projection (UPGrad, DualProj, ``project_weights``).

References are independent float64 computations of the *primal* projection onto
``{x : J x >= 0}``: ``scipy.optimize.nnls`` (Moreau: ``g + Jᵀμ``, ``μ = nnls(Jᵀ, -g)``) and, for
small ``m``, brute force over active sets. Tolerances: ``1e-6`` relative (to ``max_i ‖J_i‖``) in
float64, ``1e-4`` in float32 against the float64 reference of the same (rounded) input.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jdoptim.aggregation import DualProj, DualProjWeighting, Mean, UPGrad, UPGradWeighting
from jdoptim.linalg import gramian as linalg_gramian
from jdoptim.linalg import project_weights
from tests.aggregation import _inputs, _oracles
from tests.aggregation._inputs import to_torch

RTOL = {torch.float64: 1e-6, torch.float32: 1e-4}


def cases(max_m: int) -> list[tuple[str, np.ndarray]]:
    """Named matrices with ``m <= max_m`` rows: random, m > n, duplicated, ill-conditioned, ..."""
    all_cases = [
        ("random-3x5", _inputs.random(3, 5, 0)),
        ("random-6x4", _inputs.random(6, 4, 1)),
        ("conflicting-5x6", _inputs.conflicting(5, 6, 2)),
        ("rank-deficient-6x5-r2", _inputs.rank_deficient(6, 5, 2, 3)),
        ("more-rows-7x3", _inputs.random(7, 3, 4)),
        ("duplicated-6x4", _inputs.duplicated(6, 4, 5)),
        ("ill-conditioned-5x5-1e3", _inputs.ill_conditioned(5, 5, 1e3, 6)),
        ("opposite-rows", np.array([[1.0, -2.0, 0.5], [-1.0, 2.0, -0.5], [0.3, 1.0, 2.0]])),
        ("one-row", _inputs.random(1, 4, 7)),
        ("conflicting-32x50", _inputs.conflicting(32, 50, 8)),
        ("rank-deficient-64x16-r10", _inputs.rank_deficient(64, 16, 10, 9)),
        ("random-128x40", _inputs.random(128, 40, 10)),
        ("duplicated-128x24", _inputs.duplicated(128, 24, 11)),
        ("conflicting-128x200", _inputs.conflicting(128, 200, 12)),
    ]
    return [(name, matrix) for name, matrix in all_cases if matrix.shape[0] <= max_m]


SMALL = cases(7)
ALL = cases(128)


def assert_matches(actual: torch.Tensor, expected: np.ndarray, matrix: np.ndarray, rtol: float):
    scale = float(np.linalg.norm(matrix, axis=1).max())
    error = float(np.abs(actual.double().numpy() - expected).max())
    assert error <= rtol * scale, f"max error {error:.3e} > {rtol:.1e} x {scale:.3e}"


@pytest.mark.parametrize(("name", "matrix"), SMALL, ids=[n for n, _ in SMALL])
def test_references_agree(name, matrix):
    """Sanity of the references: NNLS and brute force give the same projections."""
    for row in [*matrix, matrix.mean(axis=0)]:
        nnls = _oracles.project_nnls(matrix, row)
        brute = _oracles.project_brute_force(matrix, row)
        assert np.allclose(nnls, brute, rtol=0, atol=1e-9 * np.linalg.norm(matrix, axis=1).max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(("name", "matrix"), SMALL, ids=[n for n, _ in SMALL])
def test_small_against_brute_force(name, matrix, dtype):
    j = to_torch(matrix, dtype)
    rounded = j.double().numpy()  # the reference sees exactly the float32 input
    ref_up = _oracles.upgrad(rounded, project=_oracles.project_brute_force)
    ref_dp = _oracles.dualproj(rounded, project=_oracles.project_brute_force)
    assert_matches(UPGrad()(j), ref_up, rounded, RTOL[dtype])
    assert_matches(DualProj()(j), ref_dp, rounded, RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(("name", "matrix"), ALL, ids=[n for n, _ in ALL])
def test_against_nnls(name, matrix, dtype):
    j = to_torch(matrix, dtype)
    rounded = j.double().numpy()
    assert_matches(UPGrad()(j), _oracles.upgrad(rounded), rounded, RTOL[dtype])
    assert_matches(DualProj()(j), _oracles.dualproj(rounded), rounded, RTOL[dtype])


@pytest.mark.parametrize(("name", "matrix"), ALL, ids=[n for n, _ in ALL])
def test_project_weights_kkt_and_nnls(name, matrix):
    """Random targets ``u`` (signs mixed): ``Jᵀw = π(Jᵀu)``, ``w >= u``, complementarity."""
    m = matrix.shape[0]
    targets = np.random.default_rng(m).normal(size=(3, m))
    targets[0] = np.eye(m)[0]
    j = to_torch(matrix)
    weights = project_weights(j @ j.T, to_torch(targets))
    assert weights.shape == (3, m)
    assert weights.dtype == torch.float64
    w = weights.numpy()
    scale = float(np.linalg.norm(matrix, axis=1).max())
    for u, wk in zip(targets, w, strict=True):
        assert np.all(wk >= u), "the multipliers μ = w - u must be non-negative"
        update = wk @ matrix
        assert_matches(
            torch.from_numpy(update), _oracles.project_nnls(matrix, u @ matrix), matrix, 1e-6
        )
        alignment = matrix @ update  # λ_j >= 0, and μ_j λ_j = 0 up to rounding
        assert alignment.min() >= -1e-6 * scale**2 * np.abs(u).sum()
        assert np.abs((wk - u) * alignment).max() <= 1e-6 * scale**2 * np.abs(u).sum() ** 2


def test_weightings_match_aggregators():
    matrix = to_torch(_inputs.conflicting(6, 5, 13))
    gramian = linalg_gramian(matrix)  # the float64 Gramian that weights() forms
    assert torch.equal(UPGradWeighting()(gramian) @ matrix, UPGrad()(matrix))
    assert torch.equal(DualProjWeighting()(gramian) @ matrix, DualProj()(matrix))
    assert bool((UPGradWeighting()(gramian) >= 1 / 6).all())  # w >= p, the docstring's claim


@pytest.mark.parametrize("pref", [[0.7, 0.2, 0.1, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
def test_pref_vector_against_nnls(pref):
    matrix = _inputs.conflicting(5, 4, 14)
    p = np.array(pref)
    j, pt = to_torch(matrix), torch.tensor(pref, dtype=torch.float64)
    assert_matches(UPGrad(pt)(j), _oracles.upgrad(matrix, p), matrix, 1e-6)
    assert_matches(DualProj(pt)(j), _oracles.dualproj(matrix, p), matrix, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("scale", [1e-8, 1e8])
@pytest.mark.parametrize(
    "name", ["conflicting-5x6", "rank-deficient-6x5-r2", "duplicated-6x4", "conflicting-32x50"]
)
def test_exact_at_tiny_and_huge_scale(name, scale, dtype):
    """The answer scales exactly: ``A(sJ) / s`` matches the reference of ``J``."""
    matrix = dict(ALL)[name]
    j = to_torch(matrix * scale, dtype)
    rounded = j.double().numpy() / scale
    assert_matches(UPGrad()(j) / scale, _oracles.upgrad(rounded), rounded, RTOL[dtype])
    assert_matches(DualProj()(j) / scale, _oracles.dualproj(rounded), rounded, RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
def test_no_collapse_to_mean_at_tiny_scale(scale, dtype):
    """Mean conflicts with ``J = [[1, 0], [-2, 1]]``; UPGrad and DualProj never do, at any scale."""
    j = torch.tensor([[1.0, 0.0], [-2.0, 1.0]], dtype=dtype) * scale
    assert float((j @ Mean()(j)).min()) < 0  # the mean (-0.5, 0.5) conflicts with row 0
    # Closed forms: π(g1) = (0.2, 0.4) (g1 projected on g2^⊥), π(g2) = (0, 1) (g2 on g1^⊥),
    # π(mean) = (0, 0.5).
    expected_up = np.array([0.1, 0.7]) * scale
    expected_dp = np.array([0.0, 0.5]) * scale
    for aggregator, expected in [(UPGrad(), expected_up), (DualProj(), expected_dp)]:
        update = aggregator(j)
        assert float((j.double() @ update.double()).min()) >= 0.0 - RTOL[dtype] * scale**2
        assert np.allclose(update.double().numpy(), expected, rtol=0, atol=RTOL[dtype] * scale)
        assert float((update - Mean()(j)).abs().max()) >= 0.1 * scale  # not the mean


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_zero_when_projection_is_zero(dtype):
    """Rows ``g`` and ``-g`` (and any extra row): the dual cone is ``g^⊥``; the projections of
    ``±g`` are 0, and with only ``g, -g`` every projection is 0."""
    g = torch.tensor([1.0, -2.0, 0.5], dtype=dtype)
    j = torch.stack([g, -g])
    tol = 10 * torch.finfo(dtype).eps * float(g.norm())
    assert float(UPGrad()(j).abs().max()) <= tol
    assert float(DualProj()(j).abs().max()) <= tol
    w = project_weights(j @ j.T, torch.eye(2, dtype=dtype))
    assert float((w @ j).abs().max()) <= tol
    # With a third row h, π(±g) = 0 still and π(h) = h - (h·g / ‖g‖²) g.
    h = torch.tensor([0.3, 1.0, 2.0], dtype=dtype)
    j3 = torch.stack([g, -g, h])
    expected = (h - (h @ g) / (g @ g) * g) / 3
    assert torch.allclose(UPGrad()(j3), expected, atol=RTOL[dtype] * float(h.norm()), rtol=0)


def test_zero_gramian_and_empty():
    """``G = 0``: every ``Jᵀw`` is 0 and the weights are the targets; ``m = 0`` gives ``[k, 0]``."""
    targets = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    assert torch.equal(project_weights(torch.zeros(3, 3, dtype=torch.float64), targets), targets)
    assert project_weights(torch.zeros(0, 0), torch.zeros(2, 0)).shape == (2, 0)
