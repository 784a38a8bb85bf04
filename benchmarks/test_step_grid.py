"""Per-sample steps over models and batch sizes, against a plain step and the peer, in one run.

Groups ``per-sample <model>, B=<b>`` hold a plain ``cross_entropy(...).mean().backward();
sgd.step()`` step, ``JacobianOptimizer(SGD, A, batch_dim=0)`` with A = Mean (the engine alone:
its weights cost nothing) and UPGrad, and the peer's Gramian engine (``torchjd.autogram``, Mean
weighting) when installed. B = 256 and 1024 are marked ``slow`` (run them with ``-m slow`` or
no marker filter). Also: the multi-task step for K = 2, 4, 8, 16 heads, the cost of the engine's
forward hooks on a forward that no step follows, and the cost of the sample-mixing check.
``benchmarks/figure.py`` draws the ratio against the batch size from the JSON of a run.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _helpers import MultiTaskModel, cnn, mlp, regression_batch, run_step
from torch import nn
from torch.nn import functional as F

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import Mean, UPGrad

BATCHES = [
    32,
    64,
    pytest.param(256, marks=pytest.mark.slow),
    pytest.param(1024, marks=pytest.mark.slow),
]
LR = 1e-3


class Transformer(nn.Module):
    """Token classifier: embedding, 2 encoder layers (d=128, 4 heads, ff 256), mean, linear."""

    def __init__(self, vocab: int = 1000, d: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 256, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embedding(tokens)).mean(dim=1))


class CausalTransformer(Transformer):
    """The same encoder with a causal attention mask (each position attends to earlier ones)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)
        h = self.encoder(self.embedding(tokens), mask=mask, is_causal=True)
        return self.head(h.mean(dim=1))


def _mlp(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths[:-1]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-2], widths[-1]))


def _digits(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    x = torch.tensor(data.data[:batch], dtype=torch.float32) / 16.0
    return x, torch.tensor(data.target[:batch])


def _random(batch: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)


def _tokens(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 1000, (batch, 32), generator=g), torch.randint(
        0, 10, (batch,), generator=g
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], Any]]] = {
    "mlp 784-256-256-10": (lambda: _mlp([784, 256, 256, 10]), lambda b: _random(b, (784,))),
    "wide mlp 784-1024-1024-10": (
        lambda: _mlp([784, 1024, 1024, 10]),
        lambda b: _random(b, (784,)),
    ),
    "cnn 1x28x28": (cnn, lambda b: _random(b, (1, 28, 28))),
    "transformer d128 seq32 2 layers": (Transformer, _tokens),
    "causal transformer d128 seq32 2 layers": (CausalTransformer, _tokens),
    "digits mlp 64-256-256-10 (real data)": (lambda: _mlp([64, 256, 256, 10]), _digits),
}


def _setup(model_name: str, batch: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    make, data = MODELS[model_name]
    torch.manual_seed(0)
    model = make()
    x, y = data(batch)
    return model, x, y


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("method", ["plain", "Mean", "UPGrad", "peer Mean"])
def test_per_sample_step(benchmark, method, model_name, batch):
    benchmark.group = f"per-sample {model_name}, B={batch}"
    benchmark.extra_info.update(model=model_name, batch=batch, method=method)
    model, x, y = _setup(model_name, batch)
    if method == "plain":
        sgd = torch.optim.SGD(model.parameters(), lr=LR)

        def step() -> None:
            sgd.zero_grad()
            F.cross_entropy(model(x), y, reduction="none").mean().backward()
            sgd.step()

    elif method == "peer Mean":
        pytest.importorskip("torchjd", reason="the peer is optional")
        if model_name.startswith("causal"):
            # torchjd 0.18's autogram vmaps every tensor argument of a module call over the batch
            # dimension, the [T, T] mask too: "Expected all tensors to have the same size".
            pytest.skip("the peer's Gramian engine fails on a 2-D attention mask")
        autogram = importlib.import_module("torchjd.autogram")
        weighting = importlib.import_module("torchjd.aggregation").MeanWeighting()
        engine = autogram.Engine(model, batch_dim=0)
        sgd = torch.optim.SGD(model.parameters(), lr=LR)

        def step() -> None:
            sgd.zero_grad()
            losses = F.cross_entropy(model(x), y, reduction="none")
            losses.backward(weighting(engine.compute_gramian(losses)))
            sgd.step()

    else:
        aggregator = Mean() if method == "Mean" else UPGrad()
        opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=LR), aggregator, batch_dim=0)

        def step() -> None:
            opt.zero_grad()  # as the plain step does (the optimizer adds to .grad otherwise)
            opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"))

    run_step(benchmark, step)


@pytest.mark.parametrize("tasks", [2, 4, 8, 16])
@pytest.mark.parametrize("method", ["plain", "Mean", "UPGrad", "peer UPGrad"])
def test_multi_task_step(benchmark, method, tasks):
    """K task losses over a shared trunk: ``shared_params=trunk`` (the layer-Gramian engine)
    against a plain step and the peer's ``mtl_backward`` + ``jac_to_grad`` with UPGrad."""
    benchmark.group = f"multi-task trunk 784-512-512 + {tasks} heads, B=128"
    benchmark.extra_info.update(tasks=tasks, method=method)
    model = MultiTaskModel(tasks)
    x, y = regression_batch(128, tasks)
    if method == "plain":
        sgd = torch.optim.SGD(model.parameters(), lr=LR)

        def step() -> None:
            sgd.zero_grad()
            ((model(x) - y) ** 2).mean(dim=0).sum().backward()
            sgd.step()

    elif method == "peer UPGrad":
        pytest.importorskip("torchjd", reason="the peer is optional")
        autojac = importlib.import_module("torchjd.autojac")
        peer_upgrad = importlib.import_module("torchjd.aggregation").UPGrad()
        sgd = torch.optim.SGD(model.parameters(), lr=LR)
        trunk = list(model.trunk.parameters())

        def step() -> None:
            sgd.zero_grad()
            h = model.trunk(x)
            losses = [((head(h)[:, 0] - y[:, t]) ** 2).mean() for t, head in enumerate(model.heads)]
            autojac.mtl_backward(losses, features=h)
            autojac.jac_to_grad(trunk, peer_upgrad)
            sgd.step()

    else:
        aggregator = Mean() if method == "Mean" else UPGrad()
        opt = JacobianOptimizer(
            torch.optim.SGD(model.parameters(), lr=LR),
            aggregator,
            shared_params=model.trunk.parameters(),
            module=model,
        )

        def step() -> None:
            opt.zero_grad()
            opt.step(lambda: ((model(x) - y) ** 2).mean(dim=0))

    run_step(benchmark, step)


@pytest.mark.parametrize("hooked", [False, True], ids=["no optimizer", "per-sample hooks"])
def test_forward_without_step(benchmark, hooked):
    """A forward (with grad) that no step follows: what the owned hooks and records cost."""
    benchmark.group = "forward only, mlp 784-256-256-10, B=64"
    model, x, _ = _setup("mlp 784-256-256-10", 64)
    opt = (
        JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=LR), batch_dim=0)
        if hooked
        else None
    )
    run_step(benchmark, lambda: model(x).sum())
    del opt


@pytest.mark.parametrize("owners", ["heap scan", "module="])
@pytest.mark.parametrize("model_name", ["mlp 784-256-256-10", "transformer 12x512"])
def test_construction(benchmark, model_name, owners):
    """Building a per-sample optimizer: finding the modules that own the parameters by a scan
    of the garbage collector's referrers (no ``module=``) or by walking ``module.modules()``."""
    benchmark.group = f"construction with batch_dim=0, {model_name}"
    if model_name.startswith("mlp"):
        model = mlp()
    else:
        layer = nn.TransformerEncoderLayer(512, 8, 2048, batch_first=True)
        model = nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)
    module = model if owners == "module=" else None

    def build() -> None:
        JacobianOptimizer(
            torch.optim.SGD(model.parameters(), lr=LR), Mean(), batch_dim=0, module=module
        )

    benchmark.pedantic(build, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("every", [None, 1], ids=["never", "every step"])
def test_sample_mixing_check(benchmark, every):
    """The per-sample Mean step with the mixing check off and on every step (default: every 100)."""
    benchmark.group = "sample-mixing check, mlp 784-256-256-10, B=64, Mean"
    model, x, y = _setup("mlp 784-256-256-10", 64)
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR), Mean(), batch_dim=0, mixing_check_every=every
    )

    def step() -> None:
        opt.zero_grad()
        opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"))

    run_step(benchmark, step)
