"""Hypothesis strategies and tolerances shared by the aggregation tests."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from tests.aggregation import _inputs

# Bounded, reproducible property runs: the battery must stay fast and deterministic in CI.
_COMMON = {
    "deadline": None,
    "derandomize": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.differing_executors],
}
SETTINGS = settings(max_examples=25, **_COMMON)
# The adversarial fuzzing: 4 examples per method by default, many more under ``-m slow``.
# No shrinking by default: the recipes are small and printable, and an expected failure (xfail)
# would otherwise spend minutes shrinking.
FUZZ_SETTINGS = settings(
    max_examples=4, phases=[Phase.explicit, Phase.reuse, Phase.generate], **_COMMON
)
FUZZ_SETTINGS_SLOW = settings(max_examples=150, **_COMMON)

# The deep profiles (many more examples, the whole grids) are slow: they run only with
# JDOPTIM_DEEP=1 (e.g. ``JDOPTIM_DEEP=1 pytest -m slow tests/aggregation``), since the default run
# does not deselect ``slow`` tests.
DEEP = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("JDOPTIM_DEEP"), reason="deep profile: JDOPTIM_DEEP=1"),
]

DTYPES = [torch.float32, torch.float64]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KINDS = ["random", "rank_deficient", "duplicated", "conflicting", "ill_conditioned"]


@st.composite
def matrices(draw, max_m: int = 8, max_n: int = 8) -> np.ndarray:
    """A float64 ``[m, n]`` matrix of one of the generator kinds, at unit scale."""
    kind = draw(st.sampled_from(KINDS))
    m = draw(st.integers(1, max_m))
    n = draw(st.integers(1, max_n))
    seed = draw(st.integers(0, 2**32 - 1))
    if kind == "random":
        return _inputs.random(m, n, seed)
    if kind == "rank_deficient":
        return _inputs.rank_deficient(m, n, draw(st.integers(1, min(m, n))), seed)
    if kind == "duplicated":
        return _inputs.duplicated(m, n, seed)
    if kind == "conflicting":
        return _inputs.conflicting(max(m, 2), n, seed)
    return _inputs.ill_conditioned(m, n, 1e4, seed)


def rounding(dtype: torch.dtype, shape: tuple[int, ...]) -> float:
    """Relative rounding allowance of a computation on an ``[m, n]`` matrix in ``dtype``."""
    return 100 * max(*shape, 1) * torch.finfo(dtype).eps


def gramian_threshold(dtype: torch.dtype, m: int) -> float:
    """``sqrt(m · eps)``: relative singular values below it vanish from a Gramian in ``dtype``."""
    return (max(m, 1) * torch.finfo(dtype).eps) ** 0.5


def row_scale(matrix: torch.Tensor) -> float:
    """``max_i ‖J_i‖`` in float64 (0 for an empty or zero matrix)."""
    if matrix.numel() == 0:
        return 0.0
    return float(matrix.double().norm(dim=1).max())


ADVERSARIAL_KINDS = ["stationary", "weakly_stationary", "rank_deficient", "spread", "duplicated"]


def build_adversarial(recipe: tuple) -> np.ndarray:
    """The float64 matrix of a recipe drawn by :func:`adversarial_recipes` (deterministic)."""
    kind, m, n, rank, decades, extra_rows, seed = recipe
    if kind in ("stationary", "weakly_stationary"):
        matrix = _inputs.stationary(m, n, rank, seed, strict=kind == "stationary")
    elif kind == "rank_deficient":
        matrix = _inputs.rank_deficient(m, n, rank, seed)
    elif kind == "spread":
        matrix = _inputs.spread_rows(_inputs.conflicting(m, n, seed), decades, seed)
    else:
        matrix = _inputs.conflicting(m, n, seed)
    if extra_rows:
        matrix = _inputs.with_duplicated_and_zero_rows(matrix, seed)
    return matrix


@st.composite
def adversarial_recipes(draw, max_m: int = 256) -> tuple:
    """A small, printable recipe ``(kind, m, n, rank, decades, extra_rows, seed)`` of a matrix from
    the families that broke methods (issue 14); :func:`build_adversarial` builds it.

    Stationary families of the literature (20 × 10 and 20 × 100 of rank 1–19 with a non-negative
    combination of rows equal to 0, strongly or weakly), rank-deficient matrices with ``m`` up to
    ``max_m``, rows spread over up to 12 decades, duplicated / zero rows (on top of the others).
    The scale is drawn separately by the tests.
    """
    kind = draw(st.sampled_from(ADVERSARIAL_KINDS))
    seed = draw(st.integers(0, 2**32 - 1))
    extra_rows = draw(st.booleans())
    m, n, rank, decades = 20, 10, 1, 0
    if kind in ("stationary", "weakly_stationary"):
        n, rank = draw(st.sampled_from([10, 100])), draw(st.integers(1, 19))
    elif kind == "rank_deficient":
        m = draw(st.sampled_from(sorted({3, 8, 32, max_m})))
        n = draw(st.sampled_from([5, 50]))
        rank = draw(st.integers(1, min(m, n) - 1))
    elif kind == "spread":
        m, n, decades = draw(st.integers(2, 12)), 10, draw(st.sampled_from([4, 12]))
    else:
        m, n = draw(st.integers(2, 8)), 6
    return kind, m, n, rank, decades, extra_rows, seed
