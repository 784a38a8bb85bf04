"""The same IWRM and functional steps, written for the peer, on jdoptim and on the peer.

What a user who switches the imports gets: the peer's autogram loop (Gramian, weights, weighted
backward) and its autojac loop (``backward`` + ``jac_to_grad``), each run on ``jdoptim`` and on
``torchjd``, next to a plain step and to ``JacobianOptimizer(..., batch_dim=0)``. MLP
784-256-256-10, batch 64, per-sample cross-entropy (m = 64), UPGrad. Run::

    python -m pytest benchmarks/test_migration.py -p no:cacheprovider --benchmark-only
"""

from __future__ import annotations

import gc
import importlib

import pytest
import torch
import torch.nn.functional as F

from benchmarks._helpers import classification_batch, mlp, run_step
from jdoptim import JacobianOptimizer
from jdoptim.aggregation import UPGrad

GROUP = "peer loops on jdoptim vs torchjd: mlp 784-256-256-10, B=64 (m=64), UPGrad"
LR = 1e-3


def _library(name: str):
    if name == "torchjd":
        pytest.importorskip("torchjd", reason="torchjd is not installed (optional competitor)")
    return (
        importlib.import_module(f"{name}.autogram"),
        importlib.import_module(f"{name}.autojac"),
        importlib.import_module(f"{name}.aggregation"),
    )


def test_plain(benchmark):
    benchmark.group = GROUP
    model, (x, y) = mlp(), classification_batch(64)
    sgd = torch.optim.SGD(model.parameters(), lr=LR)

    def step():
        sgd.zero_grad()
        F.cross_entropy(model(x), y, reduction="none").mean().backward()
        sgd.step()

    run_step(benchmark, step)


@pytest.mark.parametrize("library", ["jdoptim", "torchjd"])
def test_autogram_loop(benchmark, library):
    benchmark.group = GROUP
    autogram, _, aggregation = _library(library)
    gc.collect()  # no engine of an earlier benchmark still hooks the forward passes
    model, (x, y) = mlp(), classification_batch(64)
    sgd = torch.optim.SGD(model.parameters(), lr=LR)
    engine, weighting = autogram.Engine(model, batch_dim=0), aggregation.UPGradWeighting()

    def step():
        sgd.zero_grad()
        losses = F.cross_entropy(model(x), y, reduction="none")
        losses.backward(weighting(engine.compute_gramian(losses)))
        sgd.step()

    run_step(benchmark, step)


@pytest.mark.parametrize("library", ["jdoptim", "torchjd"])
def test_autojac_loop(benchmark, library):
    benchmark.group = GROUP
    _, autojac, aggregation = _library(library)
    model, (x, y) = mlp(), classification_batch(64)
    sgd = torch.optim.SGD(model.parameters(), lr=LR)
    aggregator = aggregation.UPGrad()

    def step():
        sgd.zero_grad()
        autojac.backward(F.cross_entropy(model(x), y, reduction="none"))
        autojac.jac_to_grad(model.parameters(), aggregator)
        sgd.step()

    run_step(benchmark, step)


def test_jacobian_optimizer_batch_dim(benchmark):
    benchmark.group = GROUP
    model, (x, y) = mlp(), classification_batch(64)
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=LR), UPGrad(), batch_dim=0)

    def closure():
        opt.zero_grad()
        return F.cross_entropy(model(x), y, reduction="none")

    run_step(benchmark, lambda: opt.step(closure))
