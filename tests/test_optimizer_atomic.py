"""A step or backward that fails after the aggregator ran leaves everything as it was.

The failures happen late on purpose, after the weigh stage: a stateful aggregator that advances
its state and then returns non-finite weights (or an update of the wrong shape). Parameters,
``.grad``, ``.jac``, the inner optimizer's state and the aggregator's state must all be exactly as
before, on every route of the path.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import Aggregator, GramianWeightedAggregator, Weighting
from tests.test_optimizer_params import ROUTES


class _CountingWeighting(Weighting):
    """Counts its calls (its state); the weights of call ``poison_at`` and later are NaN."""

    def __init__(self, poison_at: int) -> None:
        super().__init__()
        self.poison_at = poison_at
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))  # in state_dict()

    def forward(self, gramian: Tensor, /) -> Tensor:
        self.calls += 1
        weights = torch.full((gramian.shape[0],), 1.0 / gramian.shape[0], dtype=gramian.dtype)
        return weights * float("nan") if int(self.calls) >= self.poison_at else weights


class _WrongShape(Aggregator):
    """Stateful; returns the mean row until call 2, then a vector one entry too long."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))  # in state_dict()

    def forward(self, matrix: Tensor, /) -> Tensor:
        self.calls += 1
        mean = matrix.mean(dim=0)
        return mean if int(self.calls) < 2 else torch.cat([mean, mean[:1]])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))


def _losses(model: nn.Module, rows: slice = slice(None)) -> Tensor:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 4, generator=g)[rows], torch.randn(6, 2, generator=g)[rows]
    return (model(x) - y).pow(2).sum(dim=1)  # one loss per sample


def _calls(opt: JacobianOptimizer) -> int:
    """The counter, wherever it sits in the aggregator's ``state_dict`` (its weighting's)."""
    (calls,) = [v for k, v in opt.aggregator.state_dict().items() if k.endswith("calls")]
    return int(calls)


def _snapshot(model: nn.Module, opt: JacobianOptimizer) -> tuple:
    return (
        [p.detach().clone() for p in model.parameters()],
        [p.grad.clone() for p in model.parameters()],
        [p.jac.clone() for p in model.parameters()],
        str(opt.optimizer.state_dict()),
        _calls(opt),
    )


def _prepared(aggregator, kwargs) -> tuple[nn.Module, JacobianOptimizer]:
    model = _model()
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), aggregator, **kwargs
    )
    opt.step(lambda: (opt.zero_grad(), _losses(model))[1])  # call 1: momentum state, calls == 1
    for p in model.parameters():
        p.grad = torch.randn_like(p)  # populated .grad and .jac must survive a failed step
        p.jac = torch.randn(3, *p.shape)
    return model, opt


def _fail(opt: JacobianOptimizer, model: nn.Module, split: bool, entry: str) -> None:
    if split:
        opt.backward(_losses(model, slice(0, 2)), accumulate=True)
    if entry == "step":
        opt.step(lambda: _losses(model, slice(2, None) if split else slice(None)))
    else:
        opt.backward(_losses(model, slice(2, None) if split else slice(None)))


@pytest.mark.parametrize("entry", ["step", "backward"])
@pytest.mark.parametrize("route", ROUTES)
def test_non_finite_weights_raise_and_change_nothing(route, entry):
    kwargs, split = ROUTES[route]
    model, opt = _prepared(GramianWeightedAggregator(_CountingWeighting(poison_at=2)), kwargs)
    before = _snapshot(model, opt)
    assert before[-1] == 1
    with pytest.raises(ValueError, match="NaN or inf"):
        _fail(opt, model, split, entry)
    _assert_same(before, _snapshot(model, opt))


@pytest.mark.parametrize("entry", ["step", "backward"])
@pytest.mark.parametrize("route", ["jacobian", "accumulated_jacobian"])
def test_an_update_of_the_wrong_shape_raises_and_changes_nothing(route, entry):
    kwargs, split = ROUTES[route]
    model, opt = _prepared(_WrongShape(), kwargs)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="must return a vector of shape"):
        _fail(opt, model, split, entry)
    _assert_same(before, _snapshot(model, opt))


def _assert_same(before: tuple, after: tuple) -> None:
    for name, a, b in zip(("params", ".grad", ".jac"), before[:3], after[:3], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), f"{name} changed"
    assert before[3] == after[3], "the inner optimizer's state changed"
    assert before[4] == after[4], "the aggregator's state changed"


def test_the_next_step_after_a_failure_uses_the_restored_state():
    """Restoring is not freezing: a later good step advances the state from where it was."""
    model, opt = _prepared(GramianWeightedAggregator(_CountingWeighting(poison_at=3)), {})
    opt.backward(_losses(model))  # call 2: fine
    with pytest.raises(ValueError, match="NaN or inf"):
        opt.backward(_losses(model))  # call 3: poisoned, rolled back to 2
    assert _calls(opt) == 2
    assert opt._path.record.weights.isfinite().all()  # the last good record


def test_a_wrapped_step_that_raises_restores_grad_and_the_aggregator_state():
    """LBFGS needs its own closure: its step raises after our backward, before any update."""
    model = _model()
    opt = JacobianOptimizer(
        torch.optim.LBFGS(model.parameters()),
        GramianWeightedAggregator(_CountingWeighting(poison_at=99)),
    )
    for p in model.parameters():
        p.grad = torch.randn_like(p)
        p.jac = torch.randn(3, *p.shape)
    opt.aggregator.gramian_weighting.calls += 5
    before = _snapshot(model, opt)
    with pytest.raises(TypeError, match="closure"):
        opt.step(lambda: _losses(model))
    _assert_same(before, _snapshot(model, opt))


class _NaNGradient(torch.autograd.Function):
    """The identity, whose backward returns NaN: the losses are finite, their gradients are not."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return torch.full_like(grad, float("nan"))


@pytest.mark.parametrize(
    ("route", "what"), [("samples", "per-sample "), ("layers", "")], ids=["samples", "layers"]
)
def test_non_finite_gradients_raise_before_the_weighting_sees_them(route, what):
    """A Gramian engine checks its Gramian itself: the error names the gradients, the weighting
    never receives a NaN Gramian, and nothing changes."""
    kwargs, _ = ROUTES[route]
    model, opt = _prepared(GramianWeightedAggregator(_CountingWeighting(poison_at=99)), kwargs)
    seen = []
    opt.aggregator.gramian_weighting.register_forward_pre_hook(lambda _, args: seen.append(args))
    before = _snapshot(model, opt)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match=f"the {what}gradients hold NaN or inf"):
        opt.backward(_NaNGradient.apply(model(x)).pow(2).sum(dim=1))
    assert seen == []
    _assert_same(before, _snapshot(model, opt))
