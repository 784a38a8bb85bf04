"""Gramian engines across dtypes: autocast, mixed float32/float64 parameters, the whole range."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import Mean, UPGrad
from jdoptim.engine import LayerGramianEngine, PerSampleEngine
from tests.test_per_sample import _Scale


class _Mixed(nn.Module):
    """float32 layers, then float64 layers (a closed form and a fallback in each dtype)."""

    def __init__(self) -> None:
        super().__init__()
        self.low = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), _Scale(6))
        self.high = nn.Sequential(nn.Linear(6, 3), _Scale(3)).double()

    def forward(self, x):
        return self.high(self.low(x).double())


def _jacobian64(model, x, losses_of):
    """Per-loss gradients of a float64 copy of ``model``: ``{name: [m, *shape]}``."""
    ref = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in ref.named_parameters()}
    return jacrev(lambda p: losses_of(functional_call(ref, p, (x.double(),))))(params)


def _gramian(jac):
    rows = torch.cat([j.flatten(1) for j in jac.values()], dim=1)
    return rows @ rows.T


@pytest.mark.parametrize("engine_kind", ["per-sample", "layer-gramian"])
def test_mixed_float32_float64_parameters_match_jacrev(engine_kind):
    torch.manual_seed(0)
    model = _Mixed()
    x = torch.randn(6, 5)

    def losses_of(out):
        return out.pow(2).mean(dim=1)

    kwargs = {"batch_dim": 0} if engine_kind == "per-sample" else {"path": "gramian"}
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), Mean(), **kwargs)
    opt.step(lambda: losses_of(model(x)))
    jac = _jacobian64(model, x, losses_of)
    for name, p in model.named_parameters():
        assert p.grad.dtype == p.dtype, name
        torch.testing.assert_close(p.grad.double(), jac[name].mean(0), rtol=1e-5, atol=1e-7)


def _capture(store):
    def weights(gram):
        store.append(gram)
        return torch.full((gram.shape[0],), 1.0 / gram.shape[0], dtype=gram.dtype)

    return weights


class _Layers(nn.Module):
    """Linear (kernel form), LayerNorm, a fallback parameter and a bias-free Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm = nn.Linear(4, 8), nn.LayerNorm(8)
        self.scale, self.b = _Scale(8), nn.Linear(8, 2, bias=False)

    def forward(self, x):
        return self.b(self.scale(self.norm(self.a(x))))


@pytest.mark.parametrize("scale", [2.0**66, 2.0**-80, "spread"])
@pytest.mark.parametrize("engine_kind", ["per-sample", "layer-gramian"])
def test_gramian_cannot_overflow_or_underflow_in_float32(scale, engine_kind):
    """Per-loss gradients near 1e19 (Gramian near 1e40) or 1e-24 (Gramian near 1e-48), or rows
    spread over both: the float32 engines' Gramian matches float64 jacrev."""
    torch.manual_seed(1)
    model, x = _Layers(), torch.randn(5, 4)
    if scale == "spread":
        c = torch.tensor([2.0**66, 1.0, 2.0**-80, 3.0, 2.0**-135])
    else:
        c = torch.full((5,), scale)

    def losses_of(out):
        return (out * c.to(out.dtype)[:, None]).sum(dim=1)

    params = list(model.parameters())
    engine = (PerSampleEngine if engine_kind == "per-sample" else LayerGramianEngine)(
        lambda: params
    )
    seen = []
    updates, gram = engine.gramian_step(losses_of(model(x)), params, _capture(seen))
    jac = _jacobian64(model, x, losses_of)
    expected = _gramian(jac)
    assert gram.dtype == torch.float64 and bool(torch.isfinite(gram).all())
    # Relative to each pair's own scale (the diagonal), so that small rows are checked too; rows
    # near 2^-135 are float32 subnormals (about 14 significant bits), hence the tolerance.
    d = expected.diagonal().sqrt()
    torch.testing.assert_close(
        gram / torch.outer(d, d), expected / torch.outer(d, d), atol=2e-4, rtol=0
    )
    for (name, _), u in zip(model.named_parameters(), updates, strict=True):
        want = jac[name].mean(0)
        assert u.dtype == torch.float32
        if bool(torch.isfinite(want.float()).all()):
            torch.testing.assert_close(
                u.double(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max())
            )


def test_float16_model_with_large_per_sample_gradients():
    """fp16 parameters, per-loss gradient norms of several hundred (their squares overflow fp16)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).half()
    x = torch.randn(6, 8, dtype=torch.float16) * 8

    def losses_of(out):
        return out.float().sum(dim=1) * 64

    params = list(model.parameters())
    seen = []
    _, gram = PerSampleEngine(lambda: params).gramian_step(
        losses_of(model(x)), params, _capture(seen)
    )
    jac = _jacobian64(model, x, losses_of)
    expected = _gramian(jac)
    assert float(expected.diagonal().min()) > 256.0**2
    torch.testing.assert_close(gram, expected, rtol=2e-2, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "kwargs", [{"batch_dim": 0}, {"path": "gramian"}], ids=["samples", "layers"]
)
def test_autocast_in_the_gramian_engines_matches_the_jacobian_path(dtype, kwargs):
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    twin = copy.deepcopy(model)
    x = torch.randn(8, 6)

    def step(m, **options):
        opt = JacobianOptimizer(torch.optim.SGD(m.parameters(), lr=0.0), UPGrad(), **options)
        with torch.autocast("cpu", dtype=dtype):
            losses = m(x).float().pow(2).mean(dim=1)
        opt.backward(losses)
        return [p.grad for p in m.parameters()]

    fast, exact = step(model, **kwargs), step(twin, path="jacobian")
    for a, b in zip(fast, exact, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * float(b.abs().max()))
