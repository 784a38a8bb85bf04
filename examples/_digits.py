"""Multi-task learning on scikit-learn's digits: the data, the model and one training run.

Shared by ``multitask_demo.py`` (the README's demo) and ``plot_multitask_digits.py``. Four tasks
share one trunk: the digit (10 classes), its parity, whether it is at least 5, and the
reconstruction of the image (a denoising autoencoder's loss). ``JDOPTIM_QUICK=1`` shortens
every run to a few steps (the tests and the docs build use it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from jdoptim import JacobianOptimizer
from jdoptim.diagnostics import StepRecord

QUICK = os.environ.get("JDOPTIM_QUICK") == "1"
TASKS = ("digit", "parity", "at least 5", "reconstruction")
# Higher is better for the accuracies, lower for the reconstruction's mean squared error.
METRICS = ("accuracy", "accuracy", "accuracy", "MSE")


@dataclass
class Split:
    """Inputs (pixels in [0, 1], 64 per image) and digit labels of one split."""

    x: torch.Tensor
    y: torch.Tensor


def load(test_size: float = 0.25) -> tuple[Split, Split]:
    """The train and test splits of the 1797 digits (one fixed split, stratified by digit)."""
    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data / 16.0, data.target, test_size=test_size, random_state=0, stratify=data.target
    )
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return (
        Split(as_x(x_train), torch.tensor(y_train)),
        Split(as_x(x_test), torch.tensor(y_test)),
    )


class MultiTaskNet(nn.Module):
    """A trunk ``64 -> 64 -> 32`` shared by four heads (10, 2, 2 and 64 outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(32, k) for k in (10, 2, 2, 64)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.trunk(x)
        return [head(h) for head in self.heads]


def task_losses(model: MultiTaskNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The four task losses (a vector): three cross-entropies and the reconstruction's MSE."""
    digit, parity, high, image = model(x)
    ce = nn.functional.cross_entropy
    return torch.stack(
        [ce(digit, y), ce(parity, y % 2), ce(high, (y >= 5).long()), (image - x).pow(2).mean()]
    )


@torch.no_grad()
def test_metrics(model: MultiTaskNet, split: Split) -> list[float]:
    """Each task's test metric: three accuracies and the reconstruction's MSE."""
    digit, parity, high, image = model(split.x)
    y = split.y
    return [
        (digit.argmax(1) == y).float().mean().item(),
        (parity.argmax(1) == y % 2).float().mean().item(),
        (high.argmax(1) == (y >= 5).long()).float().mean().item(),
        (image - split.x).pow(2).mean().item(),
    ]


@dataclass
class Run:
    """What one training run produced."""

    metrics: list[float]  # final test metric per task
    curves: list[list[float]] = field(default_factory=list)  # test metrics at each evaluation
    eval_steps: list[int] = field(default_factory=list)
    seconds_per_step: float = 0.0
    records: list[StepRecord] = field(default_factory=list)  # with record_every > 0


def train(
    aggregator: Callable | None,
    seed: int,
    train_split: Split,
    test_split: Split,
    *,
    steps: int = 8 if QUICK else 600,
    batch_size: int = 128,
    lr: float = 1e-3,
    eval_every: int = 50,
    record_every: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Run:
    """Train from the initialisation of ``seed`` with Adam on mini-batches.

    ``aggregator=None`` steps along the gradient of the summed losses (``loss.sum().backward()``,
    no jdoptim involved); otherwise a :class:`~jdoptim.JacobianOptimizer` aggregates the
    trunk's Jacobian (``shared_params``) and the heads get their own gradients. The batches and
    the initialisation depend on ``seed`` only, so every method sees the same ones.
    """
    torch.manual_seed(seed)
    model = MultiTaskNet()
    adam = torch.optim.Adam(model.parameters(), lr=lr)
    opt = None
    run = Run(metrics=[])
    if aggregator is not None:
        opt = JacobianOptimizer(adam, aggregator, shared_params=model.trunk.parameters())
        if record_every:
            keep = lambda _, record: (  # noqa: E731
                run.records.append(record) if step % record_every == 0 else None
            )
            opt.register_step_record_hook(keep)
    batches = torch.Generator().manual_seed(seed)
    n = train_split.x.shape[0]
    elapsed = 0.0
    for step in range(steps):
        idx = torch.randint(n, (batch_size,), generator=batches)
        x, y = train_split.x[idx], train_split.y[idx]
        start = time.perf_counter()
        if opt is None:
            adam.zero_grad()
            task_losses(model, x, y).sum().backward()
            adam.step()
        else:

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                opt.zero_grad()
                return task_losses(model, x, y)

            opt.step(closure)
        elapsed += time.perf_counter() - start
        if step % eval_every == 0 or step == steps - 1:
            run.curves.append(test_metrics(model, test_split))
            run.eval_steps.append(step)
        if progress is not None:
            progress(1)
    run.metrics = run.curves[-1]
    run.seconds_per_step = elapsed / steps
    return run
