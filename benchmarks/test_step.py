"""Step time and peak memory of ``JacobianOptimizer`` against a plain ``backward(); step()``.

Each ``benchmark.group`` holds the plain step and the Jacobian-descent steps of one case, so the
ratios to the plain step can be read from one run. TorchJD, when installed, is benchmarked as an
optional competitor (skipped otherwise). See ``benchmarks/README.md`` for how to run and the
latest table.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _helpers import (
    MultiTaskModel,
    classification_batch,
    cnn,
    mlp,
    record_peak_memory,
    regression_batch,
    run_step,
)
from torch import nn
from torch.nn import functional as F

from jdoptim import JacobianOptimizer, jac_to_grad, mtl_backward
from jdoptim.aggregation import MGDA, Mean, UPGrad, UPGradWeighting
from jdoptim.linalg import project_weights_quadprog

AGGREGATORS = {"UPGrad": UPGrad, "Mean": Mean, "MGDA": MGDA}
LR = 1e-3
MLP_BATCH = 64
MTL_BATCH, MTL_TASKS = 128, 4


# --------------------------------------------------------------------------------------------
# Optional competitor: TorchJD (never installed by this project; skipped when absent).


def _torchjd() -> tuple[Any, Any]:
    """Return ``(api, aggregation module)`` of the installed TorchJD, or skip."""
    pytest.importorskip("torchjd", reason="torchjd is not installed (optional competitor)")
    aggregation = importlib.import_module("torchjd.aggregation")
    try:  # torchjd >= 0.9: backward / mtl_backward fill .jac, jac_to_grad aggregates.
        api = importlib.import_module("torchjd.autojac")
        if not hasattr(api, "jac_to_grad"):
            raise ImportError
    except ImportError:  # older torchjd: backward / mtl_backward take the aggregator.
        api = importlib.import_module("torchjd")
    return api, aggregation


def _torchjd_backward(api: Any, aggregator: Any, losses: torch.Tensor, params: list) -> None:
    if hasattr(api, "jac_to_grad"):
        api.backward(losses)
        api.jac_to_grad(params, aggregator)
    else:
        api.backward(losses, aggregator)


def _torchjd_mtl_backward(
    api: Any, aggregator: Any, losses: list, features: torch.Tensor, shared: list
) -> None:
    if hasattr(api, "jac_to_grad"):
        api.mtl_backward(losses, features=features)
        api.jac_to_grad(shared, aggregator)
    else:
        api.mtl_backward(losses, features=features, aggregator=aggregator)


# --------------------------------------------------------------------------------------------
# Per-sample losses: MLP 784-256-256-10, batch 64, one cross-entropy per sample (m = 64).

MLP_GROUP = f"mlp 784-256-256-10, per-sample losses, B={MLP_BATCH} (m={MLP_BATCH})"


def _mlp_setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = mlp()
    x, y = classification_batch(MLP_BATCH)
    return model, x, y


def test_mlp_plain(benchmark):
    benchmark.group = MLP_GROUP
    model, x, y = _mlp_setup()
    sgd = torch.optim.SGD(model.parameters(), lr=LR)

    def step():
        sgd.zero_grad()
        F.cross_entropy(model(x), y, reduction="none").mean().backward()
        sgd.step()

    run_step(benchmark, step)


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_mlp_jacobian_optimizer(benchmark, name):
    benchmark.group = MLP_GROUP
    model, x, y = _mlp_setup()
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=LR), AGGREGATORS[name]())

    def closure():
        opt.zero_grad()
        return F.cross_entropy(model(x), y, reduction="none")

    run_step(benchmark, lambda: opt.step(closure))


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_mlp_jacobian_optimizer_batch_dim(benchmark, name):
    """The same step, declaring per-sample losses (``batch_dim=0``): the per-sample engine."""
    benchmark.group = MLP_GROUP
    model, x, y = _mlp_setup()
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR), AGGREGATORS[name](), batch_dim=0
    )

    def closure():
        opt.zero_grad()
        return F.cross_entropy(model(x), y, reduction="none")

    run_step(benchmark, lambda: opt.step(closure))


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_mlp_torchjd(benchmark, name):
    benchmark.group = MLP_GROUP
    api, aggregation = _torchjd()
    model, x, y = _mlp_setup()
    params = list(model.parameters())
    sgd = torch.optim.SGD(params, lr=LR)
    aggregator = getattr(aggregation, name)()

    def step():
        sgd.zero_grad()
        _torchjd_backward(api, aggregator, F.cross_entropy(model(x), y, reduction="none"), params)
        sgd.step()

    run_step(benchmark, step)


def _torchjd_gramian_step(
    benchmark: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str
) -> None:
    """The peer's per-sample Gramian engine (``torchjd.autogram``): Gramian, weights, backward."""
    _torchjd()
    autogram = pytest.importorskip("torchjd.autogram")
    aggregation = importlib.import_module("torchjd.aggregation")
    weighting = getattr(aggregation, f"{name}Weighting")()
    engine = autogram.Engine(model, batch_dim=0)
    sgd = torch.optim.SGD(model.parameters(), lr=LR)

    def step():
        sgd.zero_grad()
        losses = F.cross_entropy(model(x), y, reduction="none")
        losses.backward(weighting(engine.compute_gramian(losses)))
        sgd.step()

    run_step(benchmark, step)


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_mlp_torchjd_autogram(benchmark, name):
    benchmark.group = MLP_GROUP
    _torchjd_gramian_step(benchmark, *_mlp_setup(), name)


# --------------------------------------------------------------------------------------------
# Per-sample losses on a small CNN: 1x28x28, conv 8 / conv 16 stride 2, linear 10, batch 64.

CNN_GROUP = f"per-sample CNN 1x28x28, B={MLP_BATCH} (m={MLP_BATCH})"


def _cnn_setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = cnn()
    x, y = classification_batch(MLP_BATCH)
    return model, x.view(-1, 1, 28, 28), y


def test_cnn_plain(benchmark):
    benchmark.group = CNN_GROUP
    model, x, y = _cnn_setup()
    sgd = torch.optim.SGD(model.parameters(), lr=LR)

    def step():
        sgd.zero_grad()
        F.cross_entropy(model(x), y, reduction="none").mean().backward()
        sgd.step()

    run_step(benchmark, step)


@pytest.mark.parametrize("batch_dim", [None, 0], ids=["jacobian", "batch_dim=0"])
@pytest.mark.parametrize("name", ["UPGrad", "Mean"])
def test_cnn_jacobian_optimizer(benchmark, name, batch_dim):
    benchmark.group = CNN_GROUP
    model, x, y = _cnn_setup()
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR), AGGREGATORS[name](), batch_dim=batch_dim
    )

    def closure():
        opt.zero_grad()
        return F.cross_entropy(model(x), y, reduction="none")

    run_step(benchmark, lambda: opt.step(closure))


@pytest.mark.parametrize("name", ["UPGrad", "Mean"])
def test_cnn_torchjd_autogram(benchmark, name):
    benchmark.group = CNN_GROUP
    _torchjd_gramian_step(benchmark, *_cnn_setup(), name)


# --------------------------------------------------------------------------------------------
# Multi-task: trunk 784-512-512, 4 linear heads, batch 128, one MSE per task (m = 4).

MTL_GROUP = f"multi-task trunk 784-512-512 + {MTL_TASKS} heads, B={MTL_BATCH} (m={MTL_TASKS})"


def _mtl_setup() -> tuple[MultiTaskModel, torch.Tensor, torch.Tensor]:
    model = MultiTaskModel(MTL_TASKS)
    x, y = regression_batch(MTL_BATCH, MTL_TASKS)
    return model, x, y


def _task_losses(model: MultiTaskModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean(dim=0)


def test_mtl_plain(benchmark):
    benchmark.group = MTL_GROUP
    model, x, y = _mtl_setup()
    sgd = torch.optim.SGD(model.parameters(), lr=LR)

    def step():
        sgd.zero_grad()
        _task_losses(model, x, y).sum().backward()
        sgd.step()

    run_step(benchmark, step)


@pytest.mark.parametrize("shared", [False, True], ids=["all-params", "shared_params=trunk"])
@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_mtl_jacobian_optimizer(benchmark, name, shared):
    benchmark.group = MTL_GROUP
    model, x, y = _mtl_setup()
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR),
        AGGREGATORS[name](),
        shared_params=model.trunk.parameters() if shared else None,
    )

    def closure():
        opt.zero_grad()
        return _task_losses(model, x, y)

    run_step(benchmark, lambda: opt.step(closure))


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_mtl_functional(benchmark, name):
    """``mtl_backward`` from the shared features, then ``jac_to_grad`` on the trunk."""
    benchmark.group = MTL_GROUP
    model, x, y = _mtl_setup()
    sgd = torch.optim.SGD(model.parameters(), lr=LR)
    aggregator = AGGREGATORS[name]()
    trunk = list(model.trunk.parameters())

    def step():
        sgd.zero_grad()
        h = model.trunk(x)
        losses = [
            ((head(h).squeeze(1) - y[:, t]) ** 2).mean() for t, head in enumerate(model.heads)
        ]
        mtl_backward(losses, h)
        jac_to_grad(trunk, aggregator)
        sgd.step()

    run_step(benchmark, step)


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_mtl_torchjd(benchmark, name):
    benchmark.group = MTL_GROUP
    api, aggregation = _torchjd()
    model, x, y = _mtl_setup()
    sgd = torch.optim.SGD(model.parameters(), lr=LR)
    aggregator = getattr(aggregation, name)()
    trunk = list(model.trunk.parameters())

    def step():
        sgd.zero_grad()
        h = model.trunk(x)
        losses = [
            ((head(h).squeeze(1) - y[:, t]) ** 2).mean() for t, head in enumerate(model.heads)
        ]
        _torchjd_mtl_backward(api, aggregator, losses, h, trunk)
        sgd.step()

    run_step(benchmark, step)


# --------------------------------------------------------------------------------------------
# The UPGrad weighting alone, on the Gramian of a random Jacobian J ~ N(0, 1) of shape [m, 1000]:
# the batched solver (``project_weights``), one-by-one quadprog (``project_weights_quadprog``,
# the reference of the target) and the peer.

GRAMIAN_COLUMNS = 1000
WEIGHTING_SIZES = [16, 64, 128, 512]


def _random_gramian(m: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(m)
    jacobian = torch.randn(m, GRAMIAN_COLUMNS, generator=g)
    return jacobian @ jacobian.T


def _run_weighting(benchmark: Any, m: int, weigh: Callable[[], Any], slow: bool) -> None:
    benchmark.group = f"UPGrad weighting, random Gramian, m={m}"
    if slow and m >= 128:  # one-by-one QPs: seconds per call at m = 512
        weigh()
        record_peak_memory(benchmark, weigh)
        benchmark.pedantic(weigh, rounds=3 if m == 128 else 1, iterations=1)
    else:
        run_step(benchmark, weigh)


@pytest.mark.parametrize("m", WEIGHTING_SIZES)
def test_upgrad_weighting(benchmark, m):
    gramian = _random_gramian(m)
    weighting = UPGradWeighting()
    _run_weighting(benchmark, m, lambda: weighting(gramian), slow=False)


@pytest.mark.parametrize("m", WEIGHTING_SIZES)
def test_upgrad_weighting_quadprog(benchmark, m):
    gramian = _random_gramian(m)
    targets = torch.eye(m)
    _run_weighting(
        benchmark, m, lambda: project_weights_quadprog(gramian, targets).mean(dim=0), slow=True
    )


@pytest.mark.parametrize("m", WEIGHTING_SIZES)
def test_upgrad_weighting_torchjd(benchmark, m):
    _, aggregation = _torchjd()
    if not hasattr(aggregation, "UPGradWeighting"):
        pytest.skip("this torchjd version has no public UPGradWeighting")
    gramian = _random_gramian(m)
    weighting = aggregation.UPGradWeighting()
    _run_weighting(benchmark, m, lambda: weighting(gramian), slow=True)
