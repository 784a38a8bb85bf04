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


def _classifier_at_initialisation(batch: int) -> torch.Tensor:
    """Per-sample gradients (float64) of an untrained digits classifier on raw pixel intensities:
    rows conflict widely, as in the first steps of real training."""
    datasets = pytest.importorskip("sklearn.datasets")
    from torch import nn
    from torch.func import functional_call, grad, vmap
    from torch.nn import functional as F

    data = datasets.load_digits()
    x = torch.tensor(data.data[:batch], dtype=torch.float64) / 16
    y = torch.tensor(data.target[:batch])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g.reshape(batch, -1) for g in per_sample.values()], dim=1)


def test_large_guesses_take_more_steps_and_the_answer_stays_exact(monkeypatch) -> None:
    """Above ``_SMALL`` rows the start continues while the first factorisations would cost more
    than more steps (here once: ~92 rows per problem after 16 steps); pivoting then gives the
    projections of scipy's NNLS."""
    from jdoptim.linalg import _start, project_weights

    jacobian = _classifier_at_initialisation(320)
    decisions: list[bool] = []
    worth = _start._worth_more_steps
    monkeypatch.setattr(
        _start, "_worth_more_steps", lambda guess: decisions.append(worth(guess)) or decisions[-1]
    )
    targets = torch.eye(320, dtype=torch.float64)[::20]
    weights = project_weights(jacobian @ jacobian.T, targets)
    assert decisions[0] and not decisions[-1]
    units, _ = unit_rows(jacobian.numpy())
    for w, u in zip(weights.numpy(), targets.numpy(), strict=True):
        g = u @ jacobian.numpy()
        mu, _ = nnls(units.T, -g, maxiter=20_000)
        expected = g + units.T @ mu
        np.testing.assert_allclose(w @ jacobian.numpy(), expected, rtol=1e-6, atol=1e-9)


def test_the_cost_rule_compares_factorisations_with_steps() -> None:
    """Full guesses (``k·m³/3`` factorisation work) are worth more steps; guesses of 5 % of the
    rows (``k·(m/20)³/3``) are not, whatever ``m`` above ``_SMALL``."""
    from jdoptim.linalg._start import _worth_more_steps

    for m in (320, 1024):
        assert _worth_more_steps(torch.ones(m, m, dtype=torch.bool))
        few = torch.zeros(m, m, dtype=torch.bool)
        few[:, : m // 20] = True
        assert not _worth_more_steps(few)
