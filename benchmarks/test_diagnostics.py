"""The cost of step records: a Jacobian-descent step without a hook, with one, and a plain step.

``register_step_record_hook`` promises that nothing is computed while no hook is registered;
with a hook, a Gramian aggregator's record costs a few ``m x m`` operations, and the Jacobian
path with a non-Gramian aggregator forms ``J Jᵀ``. One group per case, so the ratios can be read
from one run.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _helpers import MultiTaskModel, classification_batch, mlp, regression_batch
from torch.nn import functional as F

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import TrimmedMean, UPGrad
from jdoptim.diagnostics import StepRecorder

WARMUP_STEPS = 2


def _mtl(aggregator: Any, path: str) -> tuple[torch.nn.Module, JacobianOptimizer, Any]:
    model = MultiTaskModel(4)
    x, y = regression_batch(128, 4)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3)
    opt = JacobianOptimizer(sgd, aggregator, shared_params=model.trunk.parameters(), path=path)
    return model, opt, lambda: ((model(x) - y) ** 2).mean(dim=0)


def _per_sample() -> tuple[torch.nn.Module, JacobianOptimizer, Any]:
    model = mlp()
    x, y = classification_batch(64)
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), UPGrad(), batch_dim=0)
    return model, opt, lambda: F.cross_entropy(model(x), y, reduction="none")


CASES = {
    "multi-task UPGrad (layer-Gramian)": lambda: _mtl(UPGrad(), "auto"),
    "multi-task TrimmedMean (Jacobian)": lambda: _mtl(TrimmedMean(1), "jacobian"),
    "per-sample UPGrad": _per_sample,
}


@pytest.mark.parametrize("hook", ["plain", "no hook", "StepRecorder"])
@pytest.mark.parametrize("case", CASES)
def test_step_record_cost(benchmark, case, hook):
    benchmark.group = f"step records: {case}"
    _, opt, losses = CASES[case]()
    if hook == "plain":  # the summed-loss step, for scale
        sgd = opt.optimizer

        def step() -> None:
            sgd.zero_grad()
            losses().sum().backward()
            sgd.step()

    else:
        if hook == "StepRecorder":
            recorder = StepRecorder(opt)

        def step() -> None:
            opt.zero_grad()
            opt.step(losses)

    for _ in range(WARMUP_STEPS):
        step()
    benchmark(step)
    if hook == "StepRecorder":
        assert recorder.last is not None
