"""Step time on a CUDA device: a plain step against Jacobian descent, and UPGrad's weights.

Skipped without CUDA (CI has none). ``benchmarks/gpu_check.sh`` runs this file together with
``tests/test_cuda.py`` on a lent GPU machine. Every timed function ends with
``torch.cuda.synchronize()``, so the medians are device times, not launch times.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from _helpers import classification_batch, mlp
from torch.nn import functional as F

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import Mean, UPGrad, UPGradWeighting

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

DEVICE = torch.device("cuda")
BATCHES = [64, 256, 1024]


def _synchronised(step: Callable[[], Any]) -> Callable[[], None]:
    def run() -> None:
        step()
        torch.cuda.synchronize()

    return run


def _time(benchmark: Any, step: Callable[[], Any]) -> None:
    run = _synchronised(step)
    for _ in range(3):
        run()
    benchmark(run)


@pytest.mark.parametrize("batch", BATCHES)
def test_cuda_plain(benchmark: Any, batch: int) -> None:
    benchmark.group = f"cuda per-sample MLP B={batch}"
    model = mlp().to(DEVICE)
    x, y = (t.to(DEVICE) for t in classification_batch(batch))
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        sgd.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sgd.step()

    _time(benchmark, step)


@pytest.mark.parametrize("aggregator", [UPGrad, Mean], ids=["UPGrad", "Mean"])
@pytest.mark.parametrize("batch", BATCHES)
def test_cuda_per_sample(benchmark: Any, batch: int, aggregator: type) -> None:
    benchmark.group = f"cuda per-sample MLP B={batch}"
    model = mlp().to(DEVICE)
    x, y = (t.to(DEVICE) for t in classification_batch(batch))
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), aggregator(), batch_dim=0)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        return F.cross_entropy(model(x), y, reduction="none")

    _time(benchmark, lambda: opt.step(closure))


@pytest.mark.parametrize("m", [64, 256, 1024])
def test_cuda_upgrad_weights(benchmark: Any, m: int) -> None:
    benchmark.group = "cuda UPGrad weights"
    g = torch.Generator(device="cpu").manual_seed(m)
    jacobian = torch.randn(m, 4 * m, generator=g).to(DEVICE)
    gramian = jacobian @ jacobian.T
    weighting = UPGradWeighting()
    _time(benchmark, lambda: weighting(gramian))
