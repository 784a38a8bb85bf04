"""UPGrad and DualProj against float64 NNLS (scipy) on the inputs that broke them (issue 14).

The stationary families of the literature's property tests (20 × 10 and 20 × 100 of rank 1–19
with a non-negative combination of rows equal to 0, strongly and weakly), rows spread over 16
decades and a tiny opposite row, in float32 and float64. The reference is computed in float64
from the very matrix the method receives (the float32 one, when float32), by
:func:`tests.aggregation._oracles.project_nnls`. Done-when of issue 14: 1e-6 (float64) and 1e-4
(float32) relative to the longest row, and no conflict beyond rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jdoptim.aggregation import DualProj, UPGrad
from tests.aggregation import _inputs, _oracles
from tests.aggregation._strategies import DEEP

TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}
REFERENCES = {"UPGrad": (UPGrad, _oracles.upgrad), "DualProj": (DualProj, _oracles.dualproj)}


def check_against_nnls(name: str, matrix: np.ndarray, dtype: torch.dtype) -> None:
    aggregator, reference = REFERENCES[name]
    j = torch.from_numpy(matrix).to(dtype)
    # float64 NNLS on the matrix before rounding to ``dtype``: a float32 copy of a rank-deficient
    # matrix is full rank with a thin, ill-posed cone (on the weakly stationary rank-19 family its
    # own NNLS answer is 8.6e-3 R from the unrounded one); linalg.trim_gramian undoes that rounding.
    exact = reference(matrix)
    update = aggregator()(j).double().numpy()
    radius = float(np.linalg.norm(j.double().numpy(), axis=1).max())
    error = float(np.linalg.norm(update - exact))
    assert error <= TOLERANCE[dtype] * radius, f"{name}: {error:.2e} from NNLS (R = {radius:.2e})"
    worst = float((j.double().numpy() @ update).min())
    assert worst >= -100 * matrix.shape[1] * torch.finfo(dtype).eps * radius**2


def _grid(n: int, rank: int) -> list:
    """The default run keeps a few shapes (the solver takes seconds on some of them, reported);
    the rest of the grid runs with ``JDOPTIM_DEEP=1``."""
    marks = () if (n, rank) in {(10, 12), (100, 1)} else DEEP
    return [pytest.param(n, rank, marks=marks, id=f"{n}-{rank}")]


@pytest.mark.parametrize("name", list(REFERENCES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    ("n", "rank"), [p for n in (10, 100) for r in (1, 5, 12, 19) for p in _grid(n, r)]
)
@pytest.mark.parametrize("strict", [True, False], ids=["strongly", "weakly"])
def test_stationary_families(name, dtype, n, rank, strict):
    check_against_nnls(name, _inputs.stationary(20, n, rank, 100 * rank + n, strict), dtype)


@pytest.mark.parametrize("name", list(REFERENCES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_rows_spread_over_sixteen_decades(name, dtype):
    matrix = _inputs.conflicting(6, 8, 3) * np.logspace(-8, 8, 6)[:, None]
    check_against_nnls(name, matrix, dtype)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_tiny_opposite_row(name):
    """``[[1], [-1e-8]]``: the dual cone is ``{x <= 0} ∩ {x >= 0} = {0}``, the answer is 0 (it
    was 0.5: the small row's eigenvalue was dropped relative to ``λ_max``)."""
    check_against_nnls(name, np.array([[1.0], [-1e-8]]), torch.float64)
