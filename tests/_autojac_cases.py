"""Models, data and an independent Jacobian (``torch.func.jacrev``) for the autojac tests.

Data: scikit-learn's digits (offline), with a model early in training (just initialised) and late
(after 150 full-batch SGD steps), plus adversarial losses: duplicated, identically zero, scaled
over 1e12, and rank-deficient.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev


@cache
def _digits() -> tuple[Tensor, Tensor]:
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn is not installed")
    load_digits = datasets.load_digits

    data = load_digits()
    x = torch.tensor(data.data[:64] / 16.0, dtype=torch.float64)
    y = torch.tensor(data.target[:64], dtype=torch.long)
    return x, y


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()


@cache
def _state(stage: str) -> dict[str, Tensor]:
    torch.manual_seed(0)
    x, y = _digits()
    model = _mlp()
    if stage == "late":
        sgd = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(150):
            sgd.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            sgd.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def digits_model(stage: str, dtype: torch.dtype) -> tuple[nn.Module, Tensor, Tensor]:
    """A 64-16-10 MLP on 64 digits, ``stage`` "early" (initialised) or "late" (trained)."""
    x, y = _digits()
    model = _mlp()
    model.load_state_dict(_state(stage))
    return model.to(dtype), x.to(dtype), y


LOSS_FAMILIES: dict[str, Callable[[Tensor, Tensor], list[Tensor]]] = {
    # per-sample cross-entropy of the first 6 samples, as a vector
    "per-sample": lambda out, y: [nn.functional.cross_entropy(out[:6], y[:6], reduction="none")],
    # two task losses of different shapes: a scalar and a [2, 3] matrix
    "mixed-shapes": lambda out, y: [out.pow(2).mean(), out[:2, :3].sin()],
    # the same loss twice (through distinct graph nodes) and an identically zero loss
    "duplicated-and-zero": lambda out, y: [
        out[:4].pow(2).sum(1),
        out[:4].pow(2).sum(1) * 1.0,
        out[0, 0] * 0.0,
    ],
    # losses whose scales spread over 1e12
    "spread-scales": lambda out, y: [
        out[:3].sum(1) * torch.tensor([1e-6, 1.0, 1e6], dtype=out.dtype)
    ],
    # rank 1: every loss is a multiple of the same function
    "rank-deficient": lambda out, y: [
        out[0].sum() * torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=out.dtype)
    ],
}


def flat(tensors: list[Tensor]) -> Tensor:
    """The losses as the rows of the Jacobian: each flattened, then concatenated."""
    return torch.cat([t.reshape(-1) for t in tensors])


def reference_jacobians(
    model: nn.Module, x: Tensor, y: Tensor, losses: Callable[[Tensor, Tensor], list[Tensor]]
) -> dict[str, Tensor]:
    """``{name: [m, *p.shape]}`` by ``torch.func.jacrev`` of the flattened, concatenated losses."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    return jacrev(lambda p: flat(losses(functional_call(model, p, (x,)), y)))(params)
