"""``gramian``: J Jᵀ in float64 without overflow/underflow, vs exact rational arithmetic."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from jdoptim.aggregation import MGDA, UPGrad
from jdoptim.linalg import _gramian as gramian_module
from jdoptim.linalg import gramian


def _exact(matrix: torch.Tensor) -> list[list[Fraction]]:
    rows = [[Fraction(float(x)) for x in row] for row in matrix.double().tolist()]
    return [
        [sum((a * b for a, b in zip(r, s, strict=True)), Fraction(0)) for s in rows] for r in rows
    ]


def _assert_exact(matrix: torch.Tensor, rtol: float = 1e-14) -> None:
    """Each entry within ``rtol · ‖J_i‖ ‖J_j‖`` of the exact rational Gramian."""
    ours = gramian(matrix)
    assert ours.dtype == torch.float64
    exact = _exact(matrix)
    norms = [float(abs(e[i]) ** 0.5) if e[i] else 0.0 for i, e in enumerate(exact)]
    for i, row in enumerate(exact):
        for j, value in enumerate(row):
            bound = rtol * norms[i] * norms[j]
            assert abs(Fraction(float(ours[i, j])) - value) <= Fraction(bound), (i, j)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-30, 1e-23, 1.0, 1e19, 1e30])
def test_low_precision_never_overflows(dtype, scale):
    info = torch.finfo(dtype)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    matrix = (base * min(max(scale, info.tiny * 1e3), info.max / 1e3)).to(dtype)
    assert bool(torch.isfinite(matrix).all()) and bool((matrix != 0).any())
    _assert_exact(matrix)


@pytest.mark.parametrize("exponent", [-150, -100, 0, 100, 150])
def test_float64_rows_spread_over_its_range(exponent):
    gen = torch.Generator().manual_seed(1)
    matrix = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    matrix[0] *= 2.0**exponent
    matrix[1] *= 2.0**-exponent
    matrix[2] *= 10.0**exponent
    _assert_exact(matrix)


def test_float64_cross_products_of_extreme_rows():
    matrix = torch.tensor([[3e200, 4e200], [1e-200, -2e-200]], dtype=torch.float64)
    result = gramian(matrix)
    assert result[0, 1] == result[1, 0]
    assert abs(float(result[0, 1]) - (3.0 - 8.0)) <= 1e-14 * 5 * 5**0.5
    assert torch.isinf(result[0, 0])  # 2.5e401: not representable, documented


def test_chunks_give_the_same_gramian(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    matrix = torch.randn(6, 101, generator=gen) * 1e19
    whole = gramian(matrix)
    monkeypatch.setattr(gramian_module, "_CHUNK_ELEMENTS", 6 * 7)
    torch.testing.assert_close(gramian(matrix), whole, rtol=1e-14, atol=0)


def test_exactly_symmetric():
    gen = torch.Generator().manual_seed(3)
    matrix = torch.randn(17, 300, generator=gen)
    result = gramian(matrix)
    assert torch.equal(result, result.T)


def test_rejects_non_matrices():
    with pytest.raises(ValueError, match="floating-point matrix"):
        gramian(torch.zeros(3))
    with pytest.raises(ValueError, match="floating-point matrix"):
        gramian(torch.zeros(2, 2, dtype=torch.int64))


@pytest.mark.parametrize("aggregator", [UPGrad(), MGDA()], ids=["UPGrad", "MGDA"])
@pytest.mark.parametrize("scale", [1e-23, 1e-30, 1e19, 1e30])
def test_float32_aggregators_homogeneous_at_extreme_scales(aggregator, scale):
    """On main: 1e19 raised "NaN or inf" and 1e-23 underflowed (UPGrad became the mean)."""
    matrix = torch.tensor([[1.0, 0.0, 0.5], [-1.0, 1.0, 0.0], [0.25, -2.0, 1.0]])
    expected = aggregator(matrix.double())
    update = aggregator(matrix * scale)
    assert update.dtype == torch.float32
    torch.testing.assert_close(update.double() / scale, expected, rtol=1e-5, atol=1e-6)
    assert bool((matrix.double() @ (update.double() / scale) >= -1e-6).all())


def test_float16_rows_beyond_256_do_not_overflow():
    matrix = torch.tensor([[300.0, 0.0], [-300.0, 300.0]], dtype=torch.float16)
    update = UPGrad()(matrix)
    assert update.dtype == torch.float16
    torch.testing.assert_close(update.double(), torch.tensor([75.0, 225.0], dtype=torch.float64))
