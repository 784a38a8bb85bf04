"""Per-sample Jacobians captured from short, real trainings (scikit-learn's bundled data sets).

Used by the tests (``tests/linalg``, through the ``realdata`` fixture of ``tests/conftest.py``) and
by the benchmarks (``benchmarks/test_solver.py`` imports this module), so that both see the same
inputs. Everything is regenerated deterministically (fixed seeds, one thread, float32 training)
and offline: digits and breast cancer ship with scikit-learn.

Each capture trains a small model with cross-entropy and Adam on mini-batches, then records the
per-sample gradients (``torch.func.vmap`` of ``grad``) of a fixed batch of ``B`` training samples,
at initialisation ("early", step 0) and after ``steps`` steps ("late"). Late in training, the
fitted samples have near-zero gradients: the Gramian's diagonal spreads over many decades and its
condition number goes to 1e9 → ∞, which is what broke the dual-cone projection (issue 14).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["CAPTURES", "Capture", "capture"]


@dataclass(frozen=True)
class Capture:
    """One recorded per-sample Jacobian ``[B, n_params]`` (float32) and where it came from."""

    name: str  # e.g. "digits-mlp-late-B64"
    jacobian: torch.Tensor

    @property
    def gramian(self) -> torch.Tensor:
        """The float64 Gramian ``J Jᵀ`` (exact products of the float32 Jacobian)."""
        j = self.jacobian.double()
        return j @ j.T


def _data(dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_breast_cancer, load_digits

    loaded = load_digits() if dataset == "digits" else load_breast_cancer()
    x = torch.tensor(loaded.data, dtype=torch.float32)
    x = (x - x.mean(dim=0)) / (x.std(dim=0) + 1e-3)  # standardised features
    return x, torch.tensor(loaded.target, dtype=torch.long)


def _model(kind: str, features: int, classes: int) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, classes))
    # A small CNN on the 8 x 8 digit images.
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 6, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, classes),
    )


def _per_sample_jacobian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g.reshape(len(x), -1) for g in grads.values()], dim=1)


def capture(dataset: str, kind: str, sizes: tuple[int, ...], steps: int) -> list[Capture]:
    """Train ``kind`` on ``dataset`` for ``steps`` steps; Jacobians at step 0 and at the end.

    The captured batch for size ``B`` is the first ``B`` samples of a fixed permutation.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            x, y = _data(dataset)
            model = _model(kind, x.shape[1], int(y.max()) + 1)
            order = torch.randperm(len(x))
            probe_x, probe_y = x[order], y[order]
            out = [
                Capture(
                    f"{dataset}-{kind}-early-B{b}",
                    _per_sample_jacobian(model, probe_x[:b], probe_y[:b]),
                )
                for b in sizes
            ]
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
            for _ in range(steps):
                batch = torch.randint(len(x), (128,))
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
                optimizer.step()
            out += [
                Capture(
                    f"{dataset}-{kind}-late-B{b}",
                    _per_sample_jacobian(model, probe_x[:b], probe_y[:b]),
                )
                for b in sizes
            ]
            return out
    finally:
        torch.set_num_threads(threads)


# (dataset, model, batch sizes, training steps): a few seconds in all on one core.
CAPTURES = [
    ("digits", "mlp", (16, 32, 64, 128, 256), 300),
    ("digits", "cnn", (16, 64, 256), 300),
    ("breast_cancer", "mlp", (16, 64, 256), 300),
]
