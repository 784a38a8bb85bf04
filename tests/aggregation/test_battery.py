"""One battery for every entry of ``AGGREGATORS_UNDER_TEST``: contract, edge cases, properties.

Each check is against an independent statement of the property (the input itself, transformed),
never against numbers produced by jdoptim.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from jdoptim.aggregation import GramianWeightedAggregator, WeightedAggregator
from jdoptim.linalg import gramian
from tests.aggregation._inputs import EDGE_CASES, SCALES, to_torch
from tests.aggregation._strategies import (
    DEVICES,
    DTYPES,
    SETTINGS,
    gramian_threshold,
    matrices,
    rounding,
    row_scale,
)
from tests.aggregation._table import AGGREGATORS_UNDER_TEST, Entry

ENTRIES = pytest.mark.parametrize("entry", AGGREGATORS_UNDER_TEST, ids=str)
DTYPE = pytest.mark.parametrize("dtype", DTYPES, ids=str)


def assert_not_conflicting(entry: Entry, matrix: torch.Tensor, update: torch.Tensor) -> None:
    """``J A(J) >= -tol · max_i ‖J_i‖²`` (computed in float64 from the returned update)."""
    alignment = matrix.double() @ update.double()
    tol = (rounding(matrix.dtype, tuple(matrix.shape)) + entry.conflict_tol) * row_scale(
        matrix
    ) ** 2
    worst = float(alignment.min()) if alignment.numel() else 0.0
    assert worst >= -tol, f"{entry} conflicts: min (J A(J))_i = {worst:.3e} < -{tol:.3e}"


def assert_close(
    entry: Entry, actual: torch.Tensor, expected: torch.Tensor, scale: float, m: int
) -> None:
    """Equal up to the dtype's rounding (plus the entry's own ``rtol``), relative to ``scale``."""
    rtol = rounding(actual.dtype, (m, actual.numel())) + entry.rtol
    if entry.solves_on_gramian:
        rtol += gramian_threshold(actual.dtype, m)
    tol = rtol * scale
    error = float((actual.double() - expected.double()).abs().max()) if actual.numel() else 0.0
    assert error <= tol, f"{entry}: max error {error:.3e} > {tol:.3e}"


def call(entry: Entry, matrix: torch.Tensor) -> torch.Tensor:
    if matrix.shape[0] < entry.min_rows:
        with pytest.raises(ValueError):
            entry.make(matrix.shape[0])(matrix)
        pytest.skip("undefined for so few rows (ValueError checked)")
    aggregator = entry.make(matrix.shape[0])
    aggregator.reset()  # random methods: the same draws for every call of a comparison
    return aggregator(matrix)


# --- Contract and edge cases ------------------------------------------------------------------


@ENTRIES
@DTYPE
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(EDGE_CASES), ids=str)
def test_edge_cases(entry: Entry, case: str, dtype: torch.dtype, device: str):
    """Shape ``[n]``, dtype and device kept, finite, non-conflicting when claimed, at all scales."""
    base = EDGE_CASES[case]
    scales = SCALES if base.shape[0] <= 16 else [1.0]  # 256 rows: keep the battery fast
    for scale in scales:
        matrix = to_torch(base * scale, dtype, device)
        update = call(entry, matrix)
        assert isinstance(update, torch.Tensor)
        assert update.shape == (matrix.shape[1],), f"{entry} on {case}: shape {update.shape}"
        assert update.dtype == dtype
        assert update.device == matrix.device
        assert bool(torch.isfinite(update).all()), f"{entry} on {case} x{scale}: {update}"
        if entry.non_conflicting:
            assert_not_conflicting(entry, matrix, update)


@ENTRIES
def test_input_not_modified(entry: Entry):
    matrix = to_torch(EDGE_CASES["conflicting"])
    before = matrix.clone()
    call(entry, matrix)
    assert torch.equal(matrix, before)


@ENTRIES
def test_zero_matrix_gives_zero(entry: Entry):
    """``Jᵀw = 0`` whatever the weights: every ``Jᵀ W`` aggregator returns exactly 0."""
    update = call(entry, torch.zeros(4, 3, dtype=torch.float64))
    assert torch.equal(update, torch.zeros(3, dtype=torch.float64))


# --- Claimed properties, on hypothesis-drawn matrices -----------------------------------------


@ENTRIES
@SETTINGS
@given(base=matrices(), dtype=st.sampled_from(DTYPES), scale=st.sampled_from(SCALES))
def test_non_conflicting(entry: Entry, base: np.ndarray, dtype: torch.dtype, scale: float):
    if not entry.non_conflicting:
        pytest.skip(f"{entry} does not claim to be non-conflicting")
    matrix = to_torch(base * scale, dtype)
    assert_not_conflicting(entry, matrix, call(entry, matrix))


@ENTRIES
@SETTINGS
@given(
    base=matrices(),
    dtype=st.sampled_from(DTYPES),
    s=st.sampled_from([1e-6, 1e-3, 0.37, 2.0, 3.0, 1e3, 1e6]),
)
def test_positively_homogeneous(entry: Entry, base: np.ndarray, dtype: torch.dtype, s: float):
    """``A(sJ) = s A(J)`` for ``s > 0``."""
    if not entry.homogeneous:
        pytest.skip(f"{entry} does not claim positive homogeneity")
    matrix = to_torch(base, dtype)
    scaled = call(entry, to_torch(base * s, dtype))
    assert_close(entry, scaled / s, call(entry, matrix), row_scale(matrix), matrix.shape[0])


@ENTRIES
@SETTINGS
@given(base=matrices(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1))
def test_permutation_invariant(entry: Entry, base: np.ndarray, dtype: torch.dtype, seed: int):
    """``A(PJ) = A(J)`` for every row permutation ``P``."""
    if not entry.permutation_invariant:
        pytest.skip(f"{entry} does not claim permutation invariance")
    permutation = np.random.default_rng(seed).permutation(base.shape[0])
    matrix = to_torch(base, dtype)
    permuted = call(entry, to_torch(base[permutation], dtype))
    assert_close(entry, permuted, call(entry, matrix), row_scale(matrix), matrix.shape[0])


@ENTRIES
@SETTINGS
@given(data=st.data(), dtype=st.sampled_from(DTYPES), s=st.floats(-10.0, 10.0))
def test_linear(entry: Entry, data, dtype: torch.dtype, s: float):
    """``A(J1 + s J2) = A(J1) + s A(J2)`` for matrices of the same shape."""
    if not entry.linear:
        pytest.skip(f"{entry} does not claim linearity")
    first = data.draw(matrices())
    second = data.draw(matrices(max_m=first.shape[0], max_n=first.shape[1]))
    second = np.resize(second, first.shape)
    j1, j2 = to_torch(first, dtype), to_torch(second, dtype)
    expected = call(entry, j1) + s * call(entry, j2)
    scale = row_scale(j1) + abs(s) * row_scale(j2)
    assert_close(entry, call(entry, j1 + s * j2), expected, scale, j1.shape[0])


@ENTRIES
@SETTINGS
@given(base=matrices(), dtype=st.sampled_from(DTYPES))
def test_weighting_consistency(entry: Entry, base: np.ndarray, dtype: torch.dtype):
    """``A(J) = Jᵀ W(J Jᵀ)`` (Gramian-based) or ``Jᵀ W(J)``, the weights being ``[m]``."""
    if base.shape[0] < entry.min_rows:
        pytest.skip("undefined for so few rows")
    aggregator = entry.make(base.shape[0])
    if not isinstance(aggregator, WeightedAggregator):
        pytest.skip(f"{entry} is not a weighted aggregator")
    matrix = to_torch(base, dtype)
    aggregator.reset()
    update = aggregator(matrix)
    aggregator.reset()
    if isinstance(aggregator, GramianWeightedAggregator):
        # weights() forms the Gramian in float64 (jdoptim.linalg.gramian) and casts back.
        weights = aggregator.weighting(gramian(matrix)).to(dtype)
        aggregator.reset()
        assert torch.equal(aggregator.weights_from_gramian(gramian(matrix)).to(dtype), weights)
    else:
        weights = aggregator.weighting(matrix)
    assert weights.shape == (matrix.shape[0],)
    assert weights.dtype == dtype
    assert_close(entry, weights @ matrix, update, row_scale(matrix), matrix.shape[0])


@ENTRIES
@SETTINGS
@given(base=matrices(), dtype=st.sampled_from(DTYPES))
def test_deterministic(entry: Entry, base: np.ndarray, dtype: torch.dtype):
    """Two calls on the same input (after ``reset`` for random methods) agree bit for bit."""
    if base.shape[0] < entry.min_rows:
        pytest.skip("undefined for so few rows")
    matrix = to_torch(base, dtype)
    aggregator = entry.make(base.shape[0])
    aggregator.reset()
    first = aggregator(matrix)
    aggregator.reset()
    assert torch.equal(aggregator(matrix), first)
