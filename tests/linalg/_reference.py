"""Independent float64 references and adversarial inputs for the dual-cone projection.

No jdoptim code here: the projection is recomputed by scipy's NNLS on the Jacobian with its rows
scaled to unit norm (the dual cone ``{x : J x >= 0}`` does not change when rows are scaled by
positive numbers; without the scaling, NNLS loses the constraints of rows 1e-12 times smaller
than the others, as the fallback of issue 14 did).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import nnls


def unit_rows(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(Ĵ, d)``: the non-zero rows of ``matrix`` scaled to unit norm, and their norms."""
    norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix))
    keep = norms > 0
    return matrix[keep] / norms[keep, None], norms


def project(matrix: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Projection of ``g`` onto ``{x : J x >= 0}``: ``g + Ĵᵀμ`` with ``μ = nnls(Ĵᵀ, -g)``."""
    units, _ = unit_rows(matrix)
    if units.shape[0] == 0:
        return g.copy()
    mu, _ = nnls(units.T, -g, maxiter=50 * units.shape[0] + 100)
    return g + units.T @ mu


def upgrad(matrix: np.ndarray) -> np.ndarray:
    """UPGrad's update: the mean of the projections of the rows."""
    return np.mean([project(matrix, row) for row in matrix], axis=0)


def dualproj(matrix: np.ndarray) -> np.ndarray:
    """DualProj's update: the projection of the mean row."""
    return project(matrix, matrix.mean(axis=0))


def stationary(m: int, n: int, rank: int, zeros: int, seed: int) -> np.ndarray:
    """A rank-``rank`` ``[m, n]`` matrix with ``vᵀJ = 0`` for a ``v >= 0`` with ``zeros`` zeros.

    ``zeros = 0``: strongly stationary (``v > 0``: 0 is a positive combination of every row);
    ``zeros > 0``: strictly weakly stationary (0 is a non-negative combination of some rows only;
    the rows with ``v_i = 0`` are generic). Built as ``J = M R`` with the columns of ``M``
    (``[m, rank]``) orthogonal to ``v`` and ``R`` (``[rank, n]``) Gaussian. Requires
    ``rank <= m - 1``.
    """
    rng = np.random.default_rng(seed)
    v = rng.uniform(0.1, 1.0, size=m)
    v[rng.permutation(m)[:zeros]] = 0.0
    basis = rng.normal(size=(m, rank))
    basis -= np.outer(v, v @ basis) / (v @ v)  # columns orthogonal to v
    return basis @ rng.normal(size=(rank, n))


def spread_rows(m: int, n: int, decades: float, seed: int) -> np.ndarray:
    """Gaussian rows rescaled so their norms spread log-uniformly over ``decades`` decades."""
    rng = np.random.default_rng(seed)
    matrix = rng.normal(size=(m, n))
    return matrix * np.logspace(-decades / 2, decades / 2, m)[rng.permutation(m), None]


def relative_error(ours: np.ndarray, reference: np.ndarray, matrix: np.ndarray) -> float:
    """``‖ours - ref‖ / max(‖ref‖, floor)``, the floor (for updates that vanish, as on stationary
    matrices) being 1e-3 of the mean row norm."""
    floor = 1e-3 * float(np.sqrt(np.einsum("ij,ij->i", matrix, matrix)).mean())
    return float(np.linalg.norm(ours - reference) / max(np.linalg.norm(reference), floor, 1e-300))
