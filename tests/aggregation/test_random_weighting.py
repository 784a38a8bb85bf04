"""Random (RLW) against softmax weights of normal draws reproduced from the same seed.

Lin et al., TMLR 2022 (arXiv 2111.10603): at every step ``w = softmax(z)``, ``z ~ N(0, I_m)``, and
the update is ``Σ_i w_i g_i``. The draws are those of the documented generator
(``torch.randn(m, dtype=float64)`` from ``torch.Generator().manual_seed(seed)``); the softmax and
the combination are recomputed here in numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jdoptim.aggregation import GramianWeightedAggregator, Random
from jdoptim.aggregation._random_weighting import RandomWeighting
from tests.aggregation import _inputs


def paper_weights(seed: int, m: int, calls: int) -> list[np.ndarray]:
    """``softmax(z)`` for the draws of ``calls`` successive calls (numpy, stable softmax)."""
    generator = torch.Generator().manual_seed(seed)
    weights = []
    for _ in range(calls):
        z = torch.randn(m, generator=generator, dtype=torch.float64).numpy()
        e = np.exp(z - z.max())
        weights.append(e / e.sum())
    return weights


@pytest.mark.parametrize("shape", [(1, 4), (2, 3), (5, 7), (9, 3)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_softmax_of_the_normal_draws(shape, seed):
    matrix = _inputs.random(*shape, seed)
    aggregator = Random(seed=seed)
    for w in paper_weights(seed, shape[0], calls=3):
        np.testing.assert_allclose(
            aggregator(torch.from_numpy(matrix)).numpy(), w @ matrix, rtol=1e-13, atol=1e-14
        )


def test_weights_on_the_simplex_and_only_m_is_read():
    weighting = RandomWeighting(seed=4)
    w1 = weighting(torch.eye(6, dtype=torch.float64))
    weighting.reset()
    w2 = weighting(torch.randn(6, 6, dtype=torch.float64).abs() + 5.0)  # any Gramian-shaped input
    assert torch.equal(w1, w2)
    assert bool((w1 > 0).all())
    assert abs(float(w1.sum()) - 1.0) < 1e-15


def test_mean_weights_are_uniform_in_distribution():
    """Permutation invariant in distribution: ``E[w_i] = 1/m`` for every ``i`` (Monte Carlo)."""
    weighting, m, draws = RandomWeighting(seed=0), 4, 4000
    samples = torch.stack([weighting(torch.eye(m, dtype=torch.float64)) for _ in range(draws)])
    mean, std = samples.mean(dim=0), samples.std(dim=0)
    assert bool(((mean - 1 / m).abs() < 5 * std / draws**0.5).all())


def test_linear_and_homogeneous_for_given_draws():
    a = torch.from_numpy(_inputs.random(4, 6, 5))
    b = torch.from_numpy(_inputs.random(4, 6, 6))

    def fresh(matrix):
        return Random(seed=9)(matrix)

    torch.testing.assert_close(
        fresh(2.0 * a - 0.5 * b), 2.0 * fresh(a) - 0.5 * fresh(b), rtol=1e-13, atol=1e-13
    )
    for scale in [1e-6, 1e6]:
        torch.testing.assert_close(fresh(a * scale) / scale, fresh(a), rtol=1e-14, atol=0)


def test_not_permutation_invariant_for_given_draws():
    j = torch.from_numpy(_inputs.random(4, 5, 7))
    permutation = torch.tensor([1, 2, 3, 0])
    assert not torch.allclose(Random(seed=1)(j[permutation]), Random(seed=1)(j))


def test_gramian_path_uses_the_same_draws():
    j = torch.from_numpy(_inputs.random(4, 6, 9))
    aggregator = Random(seed=2)
    assert isinstance(aggregator, GramianWeightedAggregator)
    weights = aggregator.weights_from_gramian(j @ j.T)
    np.testing.assert_allclose(weights.numpy(), paper_weights(2, 4, 1)[0], rtol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_kept_and_edge_shapes(dtype):
    j = torch.from_numpy(_inputs.random(3, 4, 10)).to(dtype)
    assert Random(seed=0)(j).dtype == dtype
    assert Random(seed=0)(torch.zeros(3, 0, dtype=dtype)).shape == (0,)
    assert torch.equal(Random(seed=0)(torch.zeros(0, 2, dtype=dtype)), torch.zeros(2, dtype=dtype))


def test_repr_and_bad_seed():
    assert "seed=5" in repr(Random(seed=5))
    for seed in ["1", 1.0, True]:
        with pytest.raises(TypeError, match="seed must be an int or None"):
            Random(seed=seed)
