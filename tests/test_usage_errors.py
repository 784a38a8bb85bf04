"""Habits carried over from plain PyTorch get an error that says what to do, and change nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import MGDA, UPGrad


def _setup() -> tuple[nn.Module, JacobianOptimizer, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), UPGrad())
    return model, opt, torch.randn(8, 4)


def _snapshot(model: nn.Module, opt: JacobianOptimizer):
    return (
        [p.detach().clone() for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        repr(opt.state_dict()),
    )


def _assert_unchanged(before, after) -> None:
    for a, b in zip(before[0] + before[1], after[0] + after[1], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert before[2] == after[2]


@pytest.mark.parametrize("aggregator", [UPGrad, MGDA])
def test_an_aggregator_class_is_rejected_at_construction(aggregator):
    model = nn.Linear(2, 2)
    name = aggregator.__name__
    with pytest.raises(TypeError, match=rf"got the class {name}: pass {name}\(\) instead"):
        JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator)


def test_closure_that_backpropagates_and_returns_the_loss():
    model, opt, x = _setup()

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean(dim=0)
        loss.sum().backward()
        return loss

    before = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"did it call loss\.backward\(\)\?.*return them"):
        opt.step(closure)
    _assert_unchanged(before, _snapshot(model, opt))


@pytest.mark.parametrize("returns", ["none", "scalar"])
def test_closure_that_zeroes_in_place_then_backpropagates(returns):
    """``.grad`` objects kept (``set_to_none=False``): caught by the freed graph or the ``None``."""
    model, opt, x = _setup()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    def closure():
        opt.zero_grad(set_to_none=False)
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss if returns == "scalar" else None

    before = _snapshot(model, opt)
    match = "already backpropagated" if returns == "scalar" else "got NoneType"
    with pytest.raises((RuntimeError, TypeError), match=match) as info:
        opt.step(closure)
    assert "without calling loss.backward()" in str(info.value)
    after = _snapshot(model, opt)  # the closure itself changed .grad in place: not undone
    _assert_unchanged((before[0], [], before[2]), (after[0], [], after[2]))


def test_two_phase_then_a_closure_returning_none_steps_on_the_written_grad():
    """As Lightning's ``step()`` does after ``opt.backward(losses)``: the inner step runs once."""
    model, opt, x = _setup()
    reference = [p.detach().clone() for p in model.parameters()]
    losses = model(x).pow(2).mean(dim=0)
    opt.zero_grad()
    opt.backward(losses)
    grads = [p.grad.clone() for p in model.parameters()]
    assert opt.step(lambda: None) is None
    for p, p0, g in zip(model.parameters(), reference, grads, strict=True):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * g)  # SGD's first step: p - lr * g
    # Consumed: a second closure returning None is an error again.
    with pytest.raises(TypeError, match="got NoneType"):
        opt.step(lambda: None)


def test_a_closure_that_calls_backward_itself_is_stepped_once():
    """The closure runs ``opt.backward(losses)`` and returns the losses: no second aggregation."""
    model, opt, x = _setup()
    expected = [p.detach().clone() for p in model.parameters()]
    losses = model(x).pow(2).mean(dim=0)
    opt.zero_grad()
    opt.backward(losses)
    expected = [p0 - 0.1 * p.grad for p, p0 in zip(model.parameters(), expected, strict=True)]

    model2, opt2, _ = _setup()

    def closure():
        opt2.zero_grad()
        out = model2(x).pow(2).mean(dim=0)
        opt2.backward(out)
        return out

    returned = opt2.step(closure)
    torch.testing.assert_close(returned, losses.detach())
    for p, e in zip(model2.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e)


def test_the_step_under_autocast_aggregates_in_the_parameters_dtype():
    """``opt.step(closure)`` called inside ``torch.autocast`` (as Lightning's AMP does)."""
    model, opt, x = _setup()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        opt.step(lambda: model(x).pow(2).mean(dim=0))
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_the_layer_gramian_engine_under_autocast_matches_the_jacobian_path():
    """Autocast records bf16 layer inputs; the Gramian and the update use the weights' dtype."""
    updates = []
    for path in ("auto", "jacobian"):
        torch.manual_seed(0)
        trunk, head = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8)), nn.Linear(8, 3)
        params = [*trunk.parameters(), *head.parameters()]
        opt = JacobianOptimizer(
            torch.optim.SGD(params, lr=0.1), UPGrad(), shared_params=trunk.parameters(), path=path
        )
        x = torch.randn(16, 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            opt.step(lambda h=head, t=trunk, x=x: h(t(x)).float().pow(2).mean(dim=0))
        assert (opt.gramian_engine is not None) == (path == "auto")
        updates.append([p.grad for p in params])
    for a, b in zip(*updates, strict=True):
        assert a.dtype == torch.float32
        # Both differentiate the same bf16 graph, with different roundings (bf16: 8 bits).
        torch.testing.assert_close(a, b, rtol=0, atol=2e-2 * float(b.abs().max()))
