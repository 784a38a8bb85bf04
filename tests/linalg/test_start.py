"""The starting free sets of block pivoting against the supports of an independent NNLS."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from jdoptim.linalg._gramian import jacobi_scaled
from jdoptim.linalg._start import _starting_free_set
from tests.linalg._reference import unit_rows


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("stage", ["early", "late"])
def test_small_problems_start_near_their_free_sets(realdata, model: str, stage: str) -> None:
    """On real m = 64 per-sample Gramians the guess is the final free set of nearly every
    problem (the rows with ``μ_j > 0`` in scipy's NNLS for each row's projection): the
    previous 16-step start with the sign filter missed 7-20 rows per problem, so pivoting took
    six or seven iterations instead of one or two."""
    capture = realdata[f"digits-{model}-{stage}-B64"]
    units, _ = unit_rows(capture.jacobian.double().numpy())
    assert units.shape[0] == 64  # no zero rows: the NNLS rows are the Gramian's rows
    final = np.stack([nnls(units.T, -row, maxiter=10_000)[0] > 0 for row in units])
    _, d, scaled = jacobi_scaled(capture.gramian)
    guess = _starting_free_set(scaled, torch.diag(d)).numpy()
    assert (guess ^ final).sum(axis=1).mean() <= 0.5
