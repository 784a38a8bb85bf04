"""The per-sample step's fixed costs: host reads that do not grow with depth, scaling decided
once per step for every layer, and the exactness that the shared decision keeps."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import Mean
from jdoptim.engine import PerSampleEngine
from jdoptim.engine import _scaled as scaled
from tests.test_engine_dtypes import _capture, _gramian, _jacobian64


def _mlp(depth: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(6, 8)]
    for _ in range(depth - 1):
        layers += [nn.Tanh(), nn.Linear(8, 8)]
    return nn.Sequential(*layers, nn.Tanh(), nn.Linear(8, 3))


def _reads_per_step(depth: int, aggregator: object, monkeypatch: pytest.MonkeyPatch) -> int:
    """Host reads (``bool``/``float``/``item`` of a tensor, ``tolist``) of the second step."""
    torch.manual_seed(0)
    model = _mlp(depth)
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01), aggregator, batch_dim=0, module=model
    )
    x, y = torch.randn(9, 6), torch.randn(9, 3)

    def step() -> None:
        opt.zero_grad()
        opt.step(lambda: ((model(x) - y) ** 2).mean(dim=1))

    step()  # the first step runs the sample-mixing check, with reads of its own
    lists = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: lists.append(1) or tolist(t))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    scalars = sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")
    return scalars + len(lists)


def test_host_reads_per_step_do_not_grow_with_depth(monkeypatch):
    """Every layer's scaling is decided by one read for the whole step, and the coefficients of
    the layers' weighted sums by one more: a deeper model adds no read (there were two per
    layer, plus one per layer and bias, before). Mean: its weights read nothing (a solver's
    reads depend on the Gramian)."""
    shallow = _reads_per_step(1, Mean(), monkeypatch)
    deep = _reads_per_step(5, Mean(), monkeypatch)
    assert deep == shallow


def test_one_exponent_decision_per_step(monkeypatch):
    """The per-sample engine asks :func:`exponents_each` once per step, for all layers."""
    calls = []
    original = scaled.exponents_each

    def counted(groups):
        calls.append(len(groups))
        return original(groups)

    monkeypatch.setattr("jdoptim.engine._per_sample.exponents_each", counted)
    monkeypatch.setattr("jdoptim.engine._layer_rules.exponents_each", counted)
    torch.manual_seed(0)
    model = _mlp(3)
    params = list(model.parameters())
    engine = PerSampleEngine(lambda: params, modules=[model])
    engine.gramian_step(model(torch.randn(5, 6)).sum(dim=1), params, _capture([]))
    assert calls == [8]  # 4 Linear layers: their inputs and their output gradients


class _Shrink(nn.Module):
    """Multiplies by a constant (no parameter, not recorded)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def _step_and_reference(model, x, losses_of):
    """The per-sample engine's updates and Gramian (one weighting call), and the per-loss
    gradients of a float64 copy of ``model`` by ``jacrev``."""
    params = list(model.parameters())
    engine = PerSampleEngine(lambda: params, modules=[model])
    seen = []
    updates, gram = engine.gramian_step(losses_of(model(x)), params, _capture(seen))
    assert len(seen) == 1
    return updates, gram, _jacobian64(model, x, losses_of)


@pytest.mark.parametrize("factor", [2.0**-100, 2.0**70])
def test_layers_scaled_apart_within_one_decision(factor):
    """Between two linear layers a factor of ``2^-100`` (or ``2^70``): the first layer's output
    gradients and the second layer's inputs leave float32's comfortable range, the others do
    not. Decided together, each group keeps its own exponents: the Gramian and the updates
    match float64 ``jacrev``."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 8), _Shrink(factor), nn.Linear(8, 3))
    x = torch.randn(6, 4)

    def losses_of(out):
        return out.sum(dim=1) / factor**0.5

    updates, gram, jac = _step_and_reference(model, x, losses_of)
    expected = _gramian(jac)
    d = expected.diagonal().sqrt()
    torch.testing.assert_close(
        gram / torch.outer(d, d), expected / torch.outer(d, d), atol=1e-5, rtol=0
    )
    for (name, _), u in zip(model.named_parameters(), updates, strict=True):
        want = jac[name].mean(0)
        torch.testing.assert_close(u.double(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_shared_coefficients_belong_to_their_weights():
    """Within one step's block, coefficients are shared per weights tensor: other weights (also
    short-lived ones whose memory a later tensor reuses, as the one-hot rows that materialise a
    closed form) and other dtypes get their own, and nothing is kept after the block."""
    rows = scaled.ScaledRows(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    with scaled.shared_coefficients():
        for k in (0, 1, 0, 1):  # one-hot weights, each freed before the next is made
            w = torch.zeros(2, dtype=torch.float64)
            w[k] = 1.0
            torch.testing.assert_close(rows.combine(w), rows.scaled[k])
            del w
        small = torch.tensor([2.0**-60, 0.0], dtype=torch.float64)  # out of the window: shifted
        torch.testing.assert_close(rows.combine(small), torch.tensor([2.0**-60, 2.0**-59]))
        assert scaled.coefficients(small, None, torch.float64)[1] is None  # float64: no shift
        assert scaled.coefficients(small, None, torch.float32)[1] is not None
    assert scaled._SHARED.get() is None


class _Twice(nn.Module):
    """One Linear called on two inputs (two recorded calls of one module)."""

    def __init__(self, d: int, o: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, o)

    def forward(self, x):
        return self.fc(x) + self.fc(x.flip(-1))


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (nn.Linear(1, 1), (7, 1)),  # [B, d] inputs, per-sample gradients materialised
        (nn.Linear(5, 3), (7, 5)),  # [B, d] inputs, kernel form
        (_Twice(4, 2), (7, 4)),  # two [B, d] calls, concatenated
        (nn.Linear(4, 2), (7, 3, 4)),  # [B, T, d] inputs
    ],
    ids=["1x1", "5x3", "twice", "sequence"],
)
def test_linear_closed_forms_match_jacrev(model, shape):
    """The Linear rule on ``[B, d]`` inputs (no reshape to ``[B, 1, d]``), on several calls and
    on sequences: Gramian and update equal to float64 ``jacrev``."""
    torch.manual_seed(5)
    x = torch.randn(*shape)

    def losses_of(out):
        return out.reshape(out.shape[0], -1).pow(2).sum(dim=1)

    updates, gram, jac = _step_and_reference(model, x, losses_of)
    torch.testing.assert_close(gram, _gramian(jac), rtol=1e-5, atol=1e-5)
    for (name, _), u in zip(model.named_parameters(), updates, strict=True):
        torch.testing.assert_close(u.double(), jac[name].mean(0), rtol=1e-5, atol=1e-6)
