"""Matrix generators shared by the aggregation tests (float64 numpy, seeded, no jdoptim code)."""

from __future__ import annotations

import numpy as np
import torch


def random(m: int, n: int, seed: int) -> np.ndarray:
    """Gaussian rows."""
    return np.random.default_rng(seed).normal(size=(m, n))


def rank_deficient(m: int, n: int, rank: int, seed: int) -> np.ndarray:
    """An ``[m, n]`` product of Gaussian ``[m, rank]`` and ``[rank, n]`` factors."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(m, rank)) @ rng.normal(size=(rank, n))


def duplicated(m: int, n: int, seed: int) -> np.ndarray:
    """``ceil(m / 2)`` distinct Gaussian rows, each repeated (twice when ``m`` is even)."""
    rng = np.random.default_rng(seed)
    distinct = rng.normal(size=((m + 1) // 2, n))
    rows = np.concatenate([distinct, distinct])[:m]
    return rows[rng.permutation(m)]


def ill_conditioned(m: int, n: int, condition: float, seed: int) -> np.ndarray:
    """Singular values log-spaced from 1 down to ``1 / condition``, random singular vectors."""
    rng = np.random.default_rng(seed)
    k = min(m, n)
    u, _ = np.linalg.qr(rng.normal(size=(m, k)))
    v, _ = np.linalg.qr(rng.normal(size=(n, k)))
    return (u * np.logspace(0, -np.log10(condition), k)) @ v.T


def conflicting(m: int, n: int, seed: int) -> np.ndarray:
    """Gaussian rows around a shared direction, and one row pointing against their mean."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(m, n)) + 2.0 * rng.normal(size=n)
    rows[0] = -1.5 * rows[1:].mean(axis=0) + 0.1 * rng.normal(size=n)
    return rows


def to_torch(matrix: np.ndarray, dtype: torch.dtype = torch.float64, device: str = "cpu"):
    return torch.from_numpy(np.ascontiguousarray(matrix)).to(dtype=dtype, device=device)


# Named edge cases run through the whole battery: name -> float64 matrix at unit scale.
EDGE_CASES: dict[str, np.ndarray] = {
    "random": random(5, 7, 0),
    "conflicting": conflicting(4, 6, 1),
    "zero": np.zeros((4, 5)),
    "zero-row": np.concatenate([random(3, 4, 2), np.zeros((1, 4))]),
    "rank-deficient": rank_deficient(6, 5, 2, 3),
    "more-rows-than-columns": random(9, 3, 4),
    "duplicated-rows": duplicated(6, 4, 5),
    "opposite-rows": np.array([[1.0, -2.0, 0.5], [-1.0, 2.0, -0.5]]),
    "one-row": random(1, 5, 6),
    "one-column": random(5, 1, 7),
    "many-rows": rank_deficient(256, 8, 8, 8),
    "zero-columns": np.zeros((3, 0)),
    "ill-conditioned": ill_conditioned(5, 6, 1e6, 9),
}

SCALES = [1e-8, 1e-4, 1.0, 1e4, 1e8]


def stationary(m: int, n: int, rank: int, seed: int, strict: bool = True) -> np.ndarray:
    """An ``[m, n]`` matrix of rank ``<= rank`` with ``λᵀJ = 0`` for some ``λ >= 0``, ``λ != 0``.

    ``strict``: every ``λ_i > 0`` (strongly stationary: 0 in the relative interior of the hull);
    otherwise about half of them are 0 (weakly stationary: 0 on a face of the hull). The rows are
    combinations of ``rank`` Gaussian directions whose coefficients are projected so that
    ``λᵀA = 0``: the property tests of the literature's stationary families.
    """
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.1, 1.0, size=m)
    if not strict:
        weights[rng.permutation(m)[: m // 2]] = 0.0
    coefficients = rng.normal(size=(m, rank))
    coefficients -= np.outer(weights, weights @ coefficients) / (weights @ weights)
    return coefficients @ rng.normal(size=(rank, n))


def spread_rows(matrix: np.ndarray, decades: float, seed: int) -> np.ndarray:
    """Rows multiplied by ``10^u``, ``u`` uniform in ``[-decades/2, decades/2]``."""
    rng = np.random.default_rng(seed)
    return matrix * 10.0 ** rng.uniform(-decades / 2, decades / 2, size=(matrix.shape[0], 1))


def with_duplicated_and_zero_rows(matrix: np.ndarray, seed: int) -> np.ndarray:
    """Append a copy of a row, a positive multiple of another, and a zero row, then shuffle."""
    rng = np.random.default_rng(seed)
    i, j = rng.integers(matrix.shape[0], size=2)
    extra = np.stack([matrix[i], 3.0 * matrix[j], np.zeros(matrix.shape[1])])
    rows = np.concatenate([matrix, extra])
    return rows[rng.permutation(rows.shape[0])]
