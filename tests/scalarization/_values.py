"""Loss vectors for the scalarizer tests: random, spread over scales, and real training losses."""

from __future__ import annotations

import functools

import numpy as np
import torch


@functools.cache
def digits_losses(steps: int) -> np.ndarray:
    """The 10 per-class cross-entropies of a linear classifier of scikit-learn's digits (offline),
    after ``steps`` full-batch SGD steps from a seeded start: early and late in training."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float64)
    y = torch.tensor(y)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        per_sample = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        return np.array([float(per_sample[y == c].mean()) for c in range(10)])


def positive_cases() -> dict[str, np.ndarray]:
    """Positive loss vectors (what every scalarizer accepts)."""
    rng = np.random.default_rng(0)
    return {
        "random": rng.uniform(0.1, 3.0, size=5),
        "spread": 10.0 ** rng.uniform(-6, 6, size=6),
        "tiny": rng.uniform(1.0, 2.0, size=4) * 1e-12,
        "equal": np.full(3, 0.7),
        "one": np.array([2.5]),
        "digits-early": digits_losses(0),
        "digits-late": digits_losses(200),
    }


def leaf(values: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, requires_grad=True)


def grad_of(scalarizer, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = scalarizer(values)
    (grad,) = torch.autograd.grad(out, values)
    return out.detach(), grad
