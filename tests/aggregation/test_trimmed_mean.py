"""TrimmedMean against a brute-force numpy sort, on both of its code paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jdoptim.aggregation._trimmed_mean import (
    TrimmedMean,
    _trimmed_mean_numpy,
    _trimmed_mean_torch,
)


def brute_force(matrix: np.ndarray, t: int) -> np.ndarray:
    m = matrix.shape[0]
    columns = [sorted(matrix[:, k].tolist())[t : m - t] for k in range(matrix.shape[1])]
    return np.array([sum(c) / len(c) for c in columns])


@pytest.mark.parametrize(("m", "t"), [(1, 0), (3, 1), (4, 1), (7, 3), (10, 2), (33, 8)])
@pytest.mark.parametrize("path", ["aggregator", "torch", "numpy"])
def test_matches_brute_force(m, t, path):
    rng = np.random.default_rng(m)
    for _ in range(3):
        J = rng.normal(size=(m, 9))
        J[rng.integers(0, m, 2)] *= 1e3  # outliers
        J[:, 0] = 1.0  # a tied column
        tensor = torch.from_numpy(J)
        if path == "aggregator":
            actual = TrimmedMean(t)(tensor)
        elif path == "torch":
            actual = _trimmed_mean_torch(tensor, t)
        else:
            actual = _trimmed_mean_numpy(tensor, t)
        np.testing.assert_allclose(actual.numpy(), brute_force(J, t), rtol=1e-12, atol=1e-12)


def test_float32_paths_agree_with_float64_reference():
    J = torch.randn(40, 100)
    expected = torch.from_numpy(brute_force(J.double().numpy(), 5))
    for actual in [_trimmed_mean_torch(J, 5), _trimmed_mean_numpy(J, 5), TrimmedMean(5)(J)]:
        assert actual.dtype == torch.float32
        assert torch.allclose(actual.double(), expected, atol=1e-6)


def test_outliers_are_ignored():
    J = torch.randn(10, 5, dtype=torch.float64)
    corrupted = J.clone()
    corrupted[[0, 3]] = torch.tensor([1e30, -1e30] * 5, dtype=torch.float64).reshape(2, 5)
    honest = J[[1, 2, 4, 5, 6, 7, 8, 9]]
    expected = torch.from_numpy(brute_force(honest.numpy(), 1))
    assert torch.allclose(TrimmedMean(2)(corrupted), expected, atol=1e-12)


def test_zero_trim_is_the_mean():
    J = torch.randn(6, 4, dtype=torch.float64)
    assert torch.allclose(TrimmedMean(0)(J), J.mean(dim=0), atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_homogeneous_for_every_real_scale(dtype):
    J = torch.randn(9, 20, dtype=dtype)
    aggregator = TrimmedMean(2)
    expected = aggregator(J)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-14
    for s in [1e-6, 1e-3, 0.5, 3.0, 1e3, 1e6, -1e-6, -2.0, -1e6]:
        # Rounding relative to the entries (a cancelling column mean is not accurate to 1 ulp).
        atol = tolerance * abs(s) * float(J.abs().max())
        assert torch.allclose(aggregator(s * J), s * expected, rtol=0, atol=atol)


def test_permutation_invariant_and_translation_equivariant():
    J = torch.randn(12, 8, dtype=torch.float64)
    aggregator = TrimmedMean(3)
    expected = aggregator(J)
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        permutation = torch.randperm(12, generator=generator)
        assert torch.allclose(aggregator(J[permutation]), expected, atol=1e-15)
    shift = torch.randn(8, dtype=torch.float64)
    assert torch.allclose(aggregator(J + shift), expected + shift, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "J",
    [
        torch.zeros(5, 4),
        torch.ones(5, 4),
        torch.randn(5, 1) @ torch.randn(1, 6),
        torch.randn(256, 30),
        torch.randn(6, 3) * 1e-8,
        torch.randn(6, 3) * 1e8,
        torch.zeros(5, 0),
    ],
    ids=["zero", "duplicated", "rank1", "m256", "tiny", "huge", "no-columns"],
)
def test_finite_output(J, dtype):
    J = J.to(dtype)
    update = TrimmedMean(2)(J)
    assert update.shape == (J.shape[1],) and update.dtype == dtype
    assert bool(torch.isfinite(update).all())


def test_undefined_inputs_raise():
    with pytest.raises(ValueError, match=r"needs more than 2 \* 2 = 4 rows, got 4"):
        TrimmedMean(2)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="got 0"):
        TrimmedMean(0)(torch.randn(0, 3))


@pytest.mark.parametrize(("arg", "error"), [(-1, ValueError), (1.0, TypeError), (True, TypeError)])
def test_bad_constructor_arguments(arg, error):
    with pytest.raises(error):
        TrimmedMean(arg)


def test_stateless_and_repr():
    aggregator = TrimmedMean(3)
    assert aggregator.state_dict() == {}
    assert repr(aggregator) == "TrimmedMean(trim_number=3)"


def test_not_differentiated_when_the_input_requires_grad():
    """As every aggregator (and as TorchJD's UPGrad): the aggregation records no graph."""
    J = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    update = TrimmedMean(2)(J)
    assert not update.requires_grad
    assert torch.allclose(update, TrimmedMean(2)(J.detach()), atol=1e-15)
