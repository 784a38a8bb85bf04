"""ExcessMTL against a plain numpy loop of the paper's recurrence, and its state.

He et al., ICML 2024 (arXiv 2402.02009): weights on the simplex (a convex combination of the
losses), starting uniform, updated by exponentiated gradient with the excess risks normalised by
their initial values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jdoptim.aggregation._excess_mtl import ExcessMTL, ExcessMTLWeighting
from tests.aggregation._inputs import random


def reference_weights(matrices: list[np.ndarray], step_size: float, warmup: int) -> list:
    """AdaGrad accumulators, excess risks ``gᵀH^{-1}g``, reference, exponentiated weights."""
    m = matrices[0].shape[0]
    squares = np.zeros_like(matrices[0])
    reference = np.zeros(m)
    weights = np.full(m, 1.0 / m)
    outputs = []
    for t, matrix in enumerate(matrices):
        squares += matrix**2
        root = np.sqrt(squares)
        safe = np.where(root > 0, root, 1.0)
        risk = np.where(root > 0, matrix**2 / safe, 0.0).sum(axis=1)
        if t < max(warmup, 1):
            reference += risk / max(warmup, 1)
        if t >= max(warmup, 1) - 1:
            weights = weights * np.exp(step_size * risk / reference)
            weights = weights / weights.sum()
        outputs.append(weights.copy())
    return outputs


@pytest.mark.parametrize("step_size", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_matches_the_recurrence(step_size, warmup):
    matrices = [random(4, 6, s) * (1 + s) for s in range(7)]
    weighting = ExcessMTLWeighting(step_size, warmup)
    for matrix, expected in zip(
        matrices, reference_weights(matrices, step_size, warmup), strict=True
    ):
        np.testing.assert_allclose(
            weighting(torch.from_numpy(matrix)).numpy(), expected, rtol=1e-12
        )


def test_weights_on_the_simplex_from_uniform():
    """Issue 14: the first call gives the mean of the rows (weights ``1/m``, not ones), and every
    later call keeps ``w >= 0``, ``Σ w = 1``."""
    matrices = [torch.from_numpy(random(4, 6, s) * (1 + s)) for s in range(5)]
    weighting = ExcessMTLWeighting(2.0)
    first = weighting(matrices[0])
    torch.testing.assert_close(first, torch.full((4,), 0.25, dtype=torch.float64))
    for matrix in matrices[1:]:
        weights = weighting(matrix)
        assert bool((weights >= 0).all()) and abs(float(weights.sum()) - 1.0) < 1e-12
    torch.testing.assert_close(ExcessMTL()(matrices[0]), matrices[0].mean(dim=0))


def test_aggregator_is_weights_times_matrix():
    matrices = [torch.from_numpy(random(3, 5, s)) for s in range(3)]
    aggregator, weighting = ExcessMTL(), ExcessMTLWeighting()
    for matrix in matrices:
        torch.testing.assert_close(aggregator(matrix), weighting(matrix) @ matrix)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scale_free_weights_and_no_overflow(dtype):
    """The weights do not depend on a common scale of every call (no absolute epsilon)."""
    matrices = [torch.from_numpy(random(3, 4, s)).to(dtype) for s in range(30)]
    for s in [1e-8, 1e8]:
        a, b = ExcessMTLWeighting(5.0), ExcessMTLWeighting(5.0)
        for matrix in matrices:
            wa, wb = a(matrix), b(matrix * s)
            assert bool(torch.isfinite(wb).all())
            torch.testing.assert_close(wb, wa, rtol=1e-4, atol=1e-4)


def test_zero_rows():
    matrix = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    weighting = ExcessMTLWeighting(1.0)
    weighting(matrix)
    weighting(matrix)  # row 1: no reference yet and zero risk: ratio 0
    later = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)
    weights = weighting(later)  # row 1's first non-zero risk becomes its reference: ratio 1
    assert bool(torch.isfinite(weights).all()) and abs(float(weights.sum()) - 1.0) < 1e-12
    assert torch.equal(ExcessMTL()(torch.zeros(3, 4)), torch.zeros(4))


def test_state_round_trip_reset_and_strict_loading():
    matrices = [torch.from_numpy(random(3, 4, s)) for s in range(6)]
    first = ExcessMTLWeighting(1.5, n_warmup_steps=2)
    for matrix in matrices[:3]:
        first(matrix)
    fresh = ExcessMTLWeighting(1.5, n_warmup_steps=2)
    fresh.load_state_dict(first.state_dict())
    for matrix in matrices[3:]:
        assert torch.equal(first(matrix), fresh(matrix))
    first.reset()
    assert first.state_dict() == {
        "step": 0,
        "grad_sq_sum": None,
        "reference": None,
        "log_weights": None,
    }
    ExcessMTLWeighting().load_state_dict(first.state_dict())  # an empty state loads too
    with pytest.raises(KeyError):
        fresh.load_state_dict({"step": 0})
    with pytest.raises(ValueError, match="shape"):
        fresh(torch.zeros(2, 4, dtype=torch.float64))


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((-1.0,), ValueError),
        ((float("inf"),), ValueError),
        (("1",), TypeError),
        ((1.0, -1), ValueError),
        ((1.0, 1.5), TypeError),
    ],
)
def test_bad_arguments(args, error):
    with pytest.raises(error):
        ExcessMTL(*args)
