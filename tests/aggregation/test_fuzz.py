"""Adversarial fuzzing of every entry of the claims table (issue 14, item 4c).

Hypothesis draws from the families that broke methods, not only Gaussian matrices: stationary
(20 × 10 and 20 × 100, rank 1–19, a non-negative combination of rows equal to 0), rank-deficient
with ``m`` up to 256, rows spread over 12 decades, duplicated and zero rows, at scales from
``2^-99 ≈ 1.6e-30`` to ``2^99 ≈ 6e29``, in float32 and float64. On every finite input each method
must return a finite update without raising, and keep the properties its claims state:
non-conflicting up to the suite's rounding bound, positive homogeneity and permutation invariance.
Scales are powers of two, so ``2^j J`` is exact and the comparisons measure the method's own
rounding, not the input's. The default run draws a few examples per method;
``JDOPTIM_DEEP=1 pytest -m slow tests/aggregation`` runs the deep profile.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import nnls

from tests.aggregation._inputs import to_torch
from tests.aggregation._strategies import (
    DEEP,
    DTYPES,
    FUZZ_SETTINGS,
    FUZZ_SETTINGS_SLOW,
    adversarial_recipes,
    build_adversarial,
    rounding,
    row_scale,
)
from tests.aggregation._table import AGGREGATORS_UNDER_TEST, Entry
from tests.aggregation.test_battery import assert_close, call

ENTRIES = pytest.mark.parametrize("entry", AGGREGATORS_UNDER_TEST, ids=str)
EXPONENTS = st.integers(-99, 99)


def zero_in_hull(matrix: np.ndarray) -> bool:
    """Whether ``0`` is (to 1e-6) in the convex hull of the non-zero rows scaled to unit norm:
    the distance from 0 to the hull, by scipy's NNLS with the sum-to-one row weighted heavily."""
    norms = np.linalg.norm(matrix, axis=1)
    unit = matrix[norms > 0] / norms[norms > 0, None]
    if unit.shape[0] == 0:
        return True
    heavy = 1e6
    a = np.vstack([unit.T, heavy * np.ones((1, unit.shape[0]))])
    b = np.zeros(a.shape[0])
    b[-1] = heavy
    x, _ = nnls(a, b, maxiter=100 * a.shape[1])
    return float(np.linalg.norm(unit.T @ (x / x.sum()))) <= 1e-6


def assert_not_conflicting(entry: Entry, matrix: torch.Tensor, update: torch.Tensor) -> None:
    """``min_i (J d)_i >= -tol · R · max(R, ‖d‖)`` with ``R = max_i ‖g_i‖`` (float64).

    The suite's rounding allowance, relative to the sizes of the terms: ``R²`` for homogeneous
    methods, ``R ‖d‖`` for those whose update does not scale with the rows (FairGrad's α = 1).
    """
    alignment = matrix.double() @ update.double()
    radius = row_scale(matrix)
    tol = rounding(matrix.dtype, tuple(matrix.shape)) + entry.conflict_tol
    bound = tol * radius * max(radius, float(update.double().norm()))
    worst = float(alignment.min()) if alignment.numel() else 0.0
    assert worst >= -bound, f"{entry} conflicts: min (J A(J))_i = {worst:.3e} < -{bound:.3e}"


def check_claims(entry: Entry, recipe, dtype: torch.dtype, exponent: int, factor: int, seed: int):
    kind, base = recipe[0], build_adversarial(recipe)
    if base.shape[0] < entry.min_rows:
        return
    low = min(exponent, exponent + factor)
    factor = abs(factor)
    matrix = to_torch(base, dtype) * 2.0**low  # exact: a power of two
    update = call(entry, matrix)
    assert update.shape == (matrix.shape[1],) and update.dtype == dtype
    assert bool(torch.isfinite(update).all()), f"{entry} on {kind} x2^{low}: not finite"
    if entry.non_conflicting and not (entry.off_hull_only and zero_in_hull(base)):
        assert_not_conflicting(entry, matrix, update)
    # Rounding is relative to the rows and to the update (scale-invariant methods, FairGrad's
    # α = 1, return updates that do not shrink with the rows).
    scale = max(row_scale(matrix), float(update.double().norm()))
    if entry.homogeneous and scale > 0.0:
        scaled = call(entry, matrix * 2.0**factor) / 2.0**factor
        assert bool(torch.isfinite(scaled).all())
        assert_close(entry, scaled, update, scale, matrix.shape[0])
    if entry.permutation_invariant:
        permutation = torch.from_numpy(np.random.default_rng(seed).permutation(base.shape[0]))
        assert_close(entry, call(entry, matrix[permutation]), update, scale, matrix.shape[0])


def _fuzz(settings, max_m: int):
    @ENTRIES
    @settings
    @given(
        recipe=adversarial_recipes(max_m=max_m),
        dtype=st.sampled_from(DTYPES),
        exponent=EXPONENTS,
        factor=st.integers(-60, 60),
        seed=st.integers(0, 2**32 - 1),
    )
    def test(entry: Entry, recipe, dtype, exponent, factor, seed):
        exponent = max(min(exponent, 99 - max(factor, 0)), -99 - min(factor, 0))
        check_claims(entry, recipe, dtype, exponent, factor, seed)

    return test


# The default run keeps m <= 32 (m = 256 is covered by the battery's edge case and the deep run).
test_fuzz_claims = _fuzz(FUZZ_SETTINGS, max_m=32)
test_fuzz_claims_deep = DEEP[1](DEEP[0](_fuzz(FUZZ_SETTINGS_SLOW, max_m=256)))
