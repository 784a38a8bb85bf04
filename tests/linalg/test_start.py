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
    sizes: list[float] = []
    cost = _start._factorisation_cost
    monkeypatch.setattr(
        _start,
        "_factorisation_cost",
        lambda guess: sizes.append(float(guess.sum(dim=1).double().mean())) or cost(guess),
    )
    targets = torch.eye(320, dtype=torch.float64)[::20]
    weights = project_weights(jacobian @ jacobian.T, targets)
    assert len(sizes) == 2 and sizes[1] < sizes[0]  # one more chunk, and a smaller guess
    units, _ = unit_rows(jacobian.numpy())
    for w, u in zip(weights.numpy(), targets.numpy(), strict=True):
        g = u @ jacobian.numpy()
        mu, _ = nnls(units.T, -g, maxiter=20_000)
        expected = g + units.T @ mu
        np.testing.assert_allclose(w @ jacobian.numpy(), expected, rtol=1e-6, atol=1e-9)


def test_steps_stop_when_the_guess_no_longer_shrinks(monkeypatch) -> None:
    """Where most rows are free at the solution, more steps do not make the guess cheaper (on
    the grid's CNN at initialisation it grew from 203 to 472 rows): the first chunk whose guess
    costs as much or more ends the steps and the earlier guess is kept. Here every problem
    frees all other rows (``Ĝ = I - 0.99·(11ᵀ - I)/m``: every row pushes against every other),
    so the guess stays at 319 rows and one chunk is tried, not all up to ``_MAX_STEPS``."""
    from jdoptim.linalg import _start

    m = 320
    gramian = torch.eye(m, dtype=torch.float64) - 0.99 * torch.ones(m, m, dtype=torch.float64) / m
    gramian.diagonal().fill_(1.0)
    guesses: list[torch.Tensor] = []
    cost = _start._factorisation_cost
    monkeypatch.setattr(
        _start, "_factorisation_cost", lambda guess: guesses.append(guess) or cost(guess)
    )
    guess = _start._starting_free_set(gramian, torch.eye(m, dtype=torch.float64))
    assert len(guesses) == 2 and cost(guesses[1]) >= cost(guesses[0])
    assert guess is guesses[0]
