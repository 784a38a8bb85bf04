"""GradDrop against the paper's sign-purity masks, reproduced independently from the same draws.

Chen et al., NeurIPS 2020 (arXiv 2010.06808), Algorithm 1: per coordinate ``k``, the purity
``P_k = ½ (1 + Σ_i J_ik / Σ_i |J_ik|)``, one draw ``U_k ~ U[0, 1)``, the mask
``M_ik = 1[f(P_k) > U_k] 1[J_ik > 0] + 1[f(P_k) < U_k] 1[J_ik < 0]`` and the update
``Σ_i (ℓ_i + (1 - ℓ_i) M_ik) J_ik``. The draws are those of the aggregator's documented generator
(``torch.rand(n, dtype=float64)`` from ``torch.Generator().manual_seed(seed)``); everything else
is recomputed here, column by column, in plain Python / numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jdoptim.aggregation import GradDrop
from tests.aggregation import _inputs


def draws(seed: int, n: int, calls: int = 1) -> list[np.ndarray]:
    """The uniform draws of ``calls`` successive calls on matrices with ``n`` columns."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=generator, dtype=torch.float64).numpy() for _ in range(calls)]


def paper_graddrop(matrix: np.ndarray, uniform: np.ndarray, f=lambda p: p, leak=None):
    """Algorithm 1 of the paper, one column at a time."""
    m, n = matrix.shape
    leak = np.zeros(m) if leak is None else np.asarray(leak)
    update = np.zeros(n)
    for k in range(n):
        column = matrix[:, k]
        magnitude = np.abs(column).sum()
        purity = 0.5 * (1 + column.sum() / magnitude) if magnitude > 0 else 0.5
        fp = f(purity)
        for i in range(m):
            mask = float((fp > uniform[k] and column[i] > 0) or (fp < uniform[k] and column[i] < 0))
            update[k] += (leak[i] + (1 - leak[i]) * mask) * column[i]
    return update


MIXED = np.array(
    [
        [1.0, 2.0, -1.0, 0.0, 3.0, -0.5, 0.0],
        [3.0, -2.0, -2.0, 0.0, -1.0, 0.5, 1.0],
        [0.5, 1.0, -4.0, 0.0, -1.0, 1.5, -1.0],
    ]
)


@pytest.mark.parametrize(
    "matrix",
    [MIXED, _inputs.random(4, 50, 0), _inputs.conflicting(5, 40, 1), _inputs.random(1, 10, 2)],
    ids=["mixed", "random", "conflicting", "one-row"],
)
def test_matches_the_paper_masks(matrix):
    for seed in range(3):
        aggregator = GradDrop(seed=seed)
        j = torch.from_numpy(matrix)
        for uniform in draws(seed, matrix.shape[1], calls=3):  # successive calls, fresh draws
            np.testing.assert_allclose(
                aggregator(j).numpy(), paper_graddrop(matrix, uniform), rtol=1e-14, atol=1e-14
            )


def test_matches_with_leak_and_f():
    matrix = _inputs.conflicting(4, 30, 3)
    leak = np.array([0.0, 0.25, 1.0, 0.5])

    def f(purity):
        return purity**2

    aggregator = GradDrop(f=f, leak=torch.from_numpy(leak), seed=7)
    (uniform,) = draws(7, 30)
    expected = paper_graddrop(matrix, uniform, f=f, leak=leak)
    np.testing.assert_allclose(aggregator(torch.from_numpy(matrix)).numpy(), expected, rtol=1e-14)


def test_pure_columns_keep_every_row_and_zero_columns_give_zero():
    """``P = 1``: ``f(P) = 1 > U`` always; ``P = 0``: only the negative (all) rows are kept."""
    j = torch.from_numpy(MIXED)
    for seed in range(5):
        update = GradDrop(seed=seed)(j)
        assert float(update[0]) == 4.5  # all positive
        assert float(update[2]) == -7.0  # all negative (U > 0 with probability 1)
        assert float(update[3]) == 0.0  # zero column


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_draw_rounded_up_to_one_still_keeps_pure_columns(monkeypatch, dtype):
    """Regression: a float64 draw ``1 - 2⁻⁴⁰`` rounds to ``1.0`` in float32, and ``f(P) = 1 > U``
    then failed, dropping a column whose rows all agree (about 3e-8 of the columns per step)."""
    real_rand = torch.rand

    def rand_near_one(n, *, generator, dtype):
        real_rand(n, generator=generator, dtype=dtype)  # advance the generator as usual
        return torch.full((n,), 1.0 - 2.0**-40, dtype=dtype)

    monkeypatch.setattr(torch, "rand", rand_near_one)
    j = torch.from_numpy(MIXED).to(dtype)
    update = GradDrop(seed=0)(j)
    assert float(update[0]) == 4.5  # pure positive: f(P) = 1 > U, every row kept
    assert float(update[2]) == -7.0  # pure negative: f(P) = 0 < U, every row kept


def test_full_leak_is_the_sum():
    j = torch.from_numpy(_inputs.conflicting(4, 20, 4))
    update = GradDrop(leak=torch.ones(4, dtype=torch.float64), seed=0)(j)
    torch.testing.assert_close(update, j.sum(dim=0), rtol=1e-14, atol=1e-14)


def test_keep_probability_is_the_purity():
    """Over many independent draws a column keeps its positive part with probability ``P``."""
    column = np.array([2.0, -1.0, 0.5])  # P = ½ (1 + 1.5 / 3.5) = 5/7
    n = 20_000
    matrix = np.repeat(column[:, None], n, axis=1)
    update = GradDrop(seed=0)(torch.from_numpy(matrix)).numpy()
    kept_positive = np.isclose(update, 2.5)
    assert np.all(kept_positive | np.isclose(update, -1.0))
    p = 5 / 7
    assert abs(kept_positive.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 2.5, 1e3, 1e6])
def test_positively_homogeneous_for_given_draws(scale):
    j = torch.from_numpy(_inputs.conflicting(4, 30, 5))
    expected = GradDrop(seed=3)(j)
    torch.testing.assert_close(GradDrop(seed=3)(j * scale) / scale, expected, rtol=1e-14, atol=0)


def test_permutation_invariant_for_given_draws():
    j = torch.from_numpy(_inputs.conflicting(5, 30, 6))
    permutation = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(GradDrop(seed=1)(j[permutation]), GradDrop(seed=1)(j))
    leak = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64)
    torch.testing.assert_close(
        GradDrop(leak=leak[permutation], seed=1)(j[permutation]), GradDrop(leak=leak, seed=1)(j)
    )


def test_not_of_the_form_jt_w():
    """Coordinate-wise masks: with 2 independent rows in 3 columns the update is generally not in
    their span."""
    j = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 2.0, 1.0]], dtype=torch.float64)
    found = False
    for seed in range(20):
        update = GradDrop(seed=seed)(j)
        residual = update - j.T @ torch.linalg.lstsq(j.T, update).solution
        found |= float(residual.norm()) > 1e-6
    assert found


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_kept_and_edge_shapes(dtype):
    j = torch.from_numpy(MIXED).to(dtype)
    assert GradDrop(seed=0)(j).dtype == dtype
    assert GradDrop(seed=0)(torch.zeros(3, 0, dtype=dtype)).shape == (0,)
    assert torch.equal(
        GradDrop(seed=0)(torch.zeros(0, 4, dtype=dtype)), torch.zeros(4, dtype=dtype)
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"f": 3}, TypeError, "f must be callable"),
        ({"leak": [0.1, 0.2]}, TypeError, "leak must be a Tensor or None"),
        ({"leak": torch.tensor([[0.1]])}, ValueError, "leak must be a 1-D"),
        ({"leak": torch.tensor([1, 0])}, ValueError, "leak must be a 1-D floating-point"),
        ({"leak": torch.tensor([0.5, 1.5])}, ValueError, r"leak must hold values in \[0, 1\]"),
        ({"leak": torch.tensor([float("nan")])}, ValueError, r"leak must hold values in \[0, 1\]"),
        ({"seed": 1.5}, TypeError, "seed must be an int or None"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradDrop(**kwargs)


def test_bad_calls():
    with pytest.raises(ValueError, match="leak has 2 entries but the matrix has 3 rows"):
        GradDrop(leak=torch.tensor([0.1, 0.2]), seed=0)(torch.ones(3, 4))
    with pytest.raises(ValueError, match="f must map the purity tensor"):
        GradDrop(f=lambda p: p.sum(), seed=0)(torch.ones(3, 4))
    with pytest.raises(ValueError, match="f must map the purity tensor"):
        GradDrop(f=lambda p: p.tolist(), seed=0)(torch.ones(3, 4))
