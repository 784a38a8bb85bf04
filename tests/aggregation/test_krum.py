"""Krum / Multi-Krum against a brute-force float64 computation on the rows themselves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jdoptim.aggregation._bases import GramianWeightedAggregator
from jdoptim.aggregation._krum import Krum, KrumWeighting


def brute_force_krum(matrix: np.ndarray, f: int, k: int) -> np.ndarray:
    """Distances from the rows (not the Gramian), full sorts, the k best rows averaged; rows
    whose score ties with the k-th best (up to 1e-9 relative) share the remaining slots."""
    m = matrix.shape[0]
    scores = []
    for i in range(m):
        distances = sorted(float(np.sum((matrix[i] - matrix[j]) ** 2)) for j in range(m) if j != i)
        scores.append(sum(distances[: m - f - 2]))
    scores = np.array(scores)
    kth = np.sort(scores)[k - 1]
    tied = np.isclose(scores, kth, rtol=1e-9, atol=0)
    better = (scores < kth) & ~tied
    weights = better / k + tied * (k - better.sum()) / (k * tied.sum())
    return weights @ matrix


def honest_and_byzantine(m: int, f: int, n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    honest = rng.normal(size=(m - f, n)) + 3.0
    byzantine = rng.normal(size=(f, n)) * 50.0
    rows = np.concatenate([honest, byzantine])
    return torch.from_numpy(rows[rng.permutation(m)])


@pytest.mark.parametrize(
    ("m", "f", "k"), [(3, 0, 1), (5, 1, 1), (7, 2, 3), (10, 3, 4), (12, 1, 12)]
)
def test_matches_brute_force(m, f, k):
    for seed in range(5):
        J = honest_and_byzantine(m, f, 6, seed)
        expected = brute_force_krum(J.numpy(), f, k)
        assert torch.allclose(Krum(f, k)(J), torch.from_numpy(expected), atol=1e-12)


def test_gramian_path_equals_matrix_path():
    J = honest_and_byzantine(9, 2, 5, 0)
    aggregator = Krum(2, 3)
    assert isinstance(aggregator, GramianWeightedAggregator)
    weights = aggregator.weights_from_gramian(J @ J.T)
    assert torch.allclose(weights @ J, aggregator(J), atol=0)
    assert torch.isclose(weights.sum(), torch.tensor(1.0, dtype=J.dtype))
    assert set(weights.tolist()) <= {0.0, 1.0 / 3.0}


def test_selects_only_honest_rows():
    rng = np.random.default_rng(3)
    honest = torch.from_numpy(rng.normal(size=(8, 20)))
    byzantine = torch.full((3, 20), 1e6, dtype=torch.float64)
    J = torch.cat([honest, byzantine])
    weights = KrumWeighting(3, 5)(J @ J.T)
    assert bool((weights[8:] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_positively_homogeneous(dtype):
    J = honest_and_byzantine(9, 2, 7, 1).to(dtype)
    aggregator = Krum(2, 2)
    expected = aggregator(J)
    for s in [1e-6, 1e-3, 0.5, 1.0, 7.0, 1e3, 1e6]:
        tolerance = 1e-5 if dtype == torch.float32 else 1e-12
        assert torch.allclose(aggregator(s * J), s * expected, rtol=tolerance, atol=0)


def test_permutation_invariant():
    J = honest_and_byzantine(11, 3, 5, 2)
    aggregator = Krum(3, 4)
    expected = aggregator(J)
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        permutation = torch.randperm(11, generator=generator)
        assert torch.allclose(aggregator(J[permutation]), expected, atol=1e-12)


def test_tied_rows_share_the_slots():
    # Four symmetric rows: every score is 4, so each gets 1/4 and the update is their mean, 0.
    J = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert torch.equal(KrumWeighting(0)(J @ J.T), torch.full((4,), 0.25))
    # Rows a, b, a, b: the four scores tie; two slots shared by four rows.
    a, b = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([-3.0, 0.1, 1.0])
    J = torch.stack([a, b, a, b]).double()
    assert torch.allclose(KrumWeighting(0, 2)(J @ J.T), torch.full((4,), 0.25).double())
    # One clear winner, then a tie for the second slot between two distinct rows.
    J = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 5.0], [0.0, -5.0]]).double()
    weights = KrumWeighting(1, 2)(J @ J.T)
    assert torch.allclose(weights, torch.tensor([0.5, 0.25, 0.25, 0.0, 0.0]).double())


def test_duplicated_rows_at_every_scale_and_order():
    rng = np.random.default_rng(5)
    distinct = rng.normal(size=(3, 4))
    base = np.concatenate([distinct, distinct])
    for dtype in [torch.float32, torch.float64]:
        expected = Krum(1, 2)(torch.from_numpy(base).to(dtype)).double()
        for s in [1e-8, 1e-4, 3.0, 1e4, 1e8]:
            for seed in range(5):
                permuted = base[np.random.default_rng(seed).permutation(6)] * s
                actual = Krum(1, 2)(torch.from_numpy(permuted).to(dtype)).double() / s
                assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "J",
    [
        torch.zeros(5, 4),
        torch.ones(5, 4),  # duplicated rows
        torch.randn(5, 1) @ torch.randn(1, 6),  # rank one
        torch.randn(256, 30),
        torch.randn(6, 3) * 1e-8,
        torch.randn(6, 3) * 1e8,
        torch.zeros(5, 0),
    ],
    ids=["zero", "duplicated", "rank1", "m256", "tiny", "huge", "no-columns"],
)
def test_finite_output(J, dtype):
    J = J.to(dtype)
    update = Krum(1, 2)(J)
    assert update.shape == (J.shape[1],) and update.dtype == dtype
    assert bool(torch.isfinite(update).all())


def test_undefined_inputs_raise():
    with pytest.raises(ValueError, match=r"needs at least 1 \+ 3 = 4 rows .*, got 3"):
        Krum(1)(torch.randn(3, 3))
    with pytest.raises(ValueError, match="got 1"):
        Krum(0)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="n_selected=6 exceeds the number of rows 5"):
        Krum(1, 6)(torch.randn(5, 3))


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((-1,), ValueError),
        ((1, 0), ValueError),
        ((1.0,), TypeError),
        ((True,), TypeError),
        ((1, 2.5), TypeError),
    ],
)
def test_bad_constructor_arguments(args, error):
    with pytest.raises(error):
        Krum(*args)


def test_stateless_and_repr():
    aggregator = Krum(2, 3)
    assert aggregator.state_dict() == {}
    aggregator.load_state_dict({})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        aggregator.load_state_dict({"x": 1})
    assert repr(aggregator) == "Krum(n_byzantine=2, n_selected=3)"
