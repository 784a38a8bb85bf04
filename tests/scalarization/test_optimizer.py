"""Scalarizers through ``JacobianOptimizer``: one plain backward, state in its ``state_dict``."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from jdoptim import JacobianOptimizer
from jdoptim import aggregation as agg
from jdoptim.scalarization import DWA, FAMO, UW, GeometricMean, Mean, Random


def _data(batches: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)) for _ in range(batches)
    ]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).pow(2).mean(dim=0) + 0.1  # one positive loss per output


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("scalarizer", [Mean(), GeometricMean(), Random(seed=2)], ids=str)
def test_a_step_is_one_plain_backward_of_the_scalar(scalarizer):
    plain_model, model = _model(), _model()
    plain_scalarizer = copy.deepcopy(scalarizer)
    plain = torch.optim.SGD(plain_model.parameters(), lr=0.1, momentum=0.9)
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), scalarizer)
    for x, y in _data():
        plain.zero_grad()
        plain_scalarizer(_losses(plain_model, x, y)).backward()
        plain.step()
        returned = opt.step(lambda x=x, y=y: (opt.zero_grad(), _losses(model, x, y))[1])
        assert returned.shape == (3,) and not returned.requires_grad
    for a, b in zip(_params(plain_model), _params(model), strict=True):
        assert torch.equal(a, b)


def test_mean_scalarizer_and_mean_aggregator_take_the_same_steps():
    a, b = _model(), _model()
    opt_a = JacobianOptimizer(torch.optim.SGD(a.parameters(), lr=0.1), Mean())
    opt_b = JacobianOptimizer(torch.optim.SGD(b.parameters(), lr=0.1), agg.Mean())
    for x, y in _data():
        opt_a.step(lambda x=x, y=y: (opt_a.zero_grad(), _losses(a, x, y))[1])
        opt_b.step(lambda x=x, y=y: (opt_b.zero_grad(), _losses(b, x, y))[1])
    for p, q in zip(_params(a), _params(b), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def _famo_run(checkpoint_at: int | None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """FAMO's loop through the optimizer; optionally resumed from a checkpoint mid-run."""
    model, famo = _model(), FAMO(3)
    opt = JacobianOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), famo)
    for i, (x, y) in enumerate(_data(6)):
        if i == checkpoint_at:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            model, famo = _model(), FAMO(3)
            opt = JacobianOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), famo)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
        opt.step(lambda x=x, y=y, m=model, o=opt: (o.zero_grad(), _losses(m, x, y))[1])
        with torch.no_grad():
            famo.update(_losses(model, x, y))  # FAMO's place: after the step, the same batch
    return _params(model), famo.logits.detach().clone()


def test_famo_through_the_optimizer_matches_a_plain_loop_and_resumes_bit_for_bit():
    params, logits = _famo_run(None)
    model, famo = _model(), FAMO(3)
    plain = torch.optim.Adam(model.parameters(), lr=0.01)
    for x, y in _data(6):
        plain.zero_grad()
        famo(_losses(model, x, y)).backward()
        plain.step()
        with torch.no_grad():
            famo.update(_losses(model, x, y))
    assert all(torch.equal(a, b) for a, b in zip(params, _params(model), strict=True))
    assert torch.equal(logits, famo.logits.detach()) and float(logits.abs().max()) > 0
    resumed_params, resumed_logits = _famo_run(checkpoint_at=3)
    assert all(torch.equal(a, b) for a, b in zip(params, resumed_params, strict=True))
    assert torch.equal(logits, resumed_logits)


def test_dwa_per_epoch_and_uw_parameters_resume_from_the_optimizer_state():
    def run(stop_after: int | None, resume: dict | None) -> tuple:
        model, dwa = _model(), DWA()
        opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), dwa)
        if resume is not None:
            model.load_state_dict(resume["model"])
            opt.load_state_dict(resume["opt"])
        start = 0 if resume is None else resume["epoch"]
        for epoch in range(start, 4):
            if epoch == stop_after:
                return {"model": copy.deepcopy(model.state_dict()),
                        "opt": copy.deepcopy(opt.state_dict()), "epoch": epoch}  # fmt: skip
            for x, y in _data():
                opt.step(lambda x=x, y=y: (opt.zero_grad(), _losses(model, x, y))[1])
            dwa.step()  # DWA's place: once per epoch
        return _params(model), dwa.weights(3)

    params, weights = run(None, None)
    assert not torch.equal(weights, torch.ones(3, dtype=torch.float64))  # DWA took effect
    resumed = run(None, run(stop_after=2, resume=None))
    assert all(torch.equal(a, b) for a, b in zip(params, resumed[0], strict=True))
    assert torch.equal(weights, resumed[1])


def test_uw_log_variances_are_learned_by_the_wrapped_optimizer_and_checkpointed():
    model, uw = _model(), UW(3)
    opt = JacobianOptimizer(torch.optim.SGD([*model.parameters(), *uw.parameters()], lr=0.1), uw)
    for x, y in _data():
        opt.step(lambda x=x, y=y: (opt.zero_grad(), _losses(model, x, y))[1])
    assert float(uw.log_var.detach().abs().min()) > 0  # it moved
    state = copy.deepcopy(opt.state_dict())
    assert torch.equal(state["jdoptim"]["aggregator"]["log_var"], uw.log_var.detach())


def test_a_failed_step_leaves_the_scalarizer_state_unchanged():
    model, dwa = _model(), DWA()
    opt = JacobianOptimizer(torch.optim.LBFGS(model.parameters()), dwa)
    before = copy.deepcopy(dwa.get_extra_state())
    x, y = _data()[0]
    with pytest.raises(TypeError, match="closure"):  # LBFGS's own step needs its closure
        opt.step(lambda: _losses(model, x, y))
    assert dwa.get_extra_state() == before and all(p.grad is None for p in model.parameters())


def test_options_that_need_an_aggregator_are_rejected():
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="shared_params needs an aggregator"):
        JacobianOptimizer(sgd, Mean(), shared_params=list(model[0].parameters()))
    with pytest.raises(ValueError, match="batch_dim=0 needs an aggregator"):
        JacobianOptimizer(sgd, Mean(), batch_dim=0)
    opt = JacobianOptimizer(sgd, Mean())
    x, y = _data()[0]
    with pytest.raises(ValueError, match="accumulate=True needs an aggregator"):
        opt.backward(_losses(model, x, y), accumulate=True)
    assert all(p.grad is None for p in model.parameters())


def test_grad_scaler_sees_the_scaled_scalar_of_the_unscaled_losses():
    """GeometricMean is not linear: scaling the losses first would change its gradient."""
    a, b = _model(), _model()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = JacobianOptimizer(torch.optim.SGD(a.parameters(), lr=0.1), GeometricMean(),
                            grad_scaler=scaler)  # fmt: skip
    plain = torch.optim.SGD(b.parameters(), lr=0.1)
    x, y = _data()[0]
    opt.backward(scaler.scale(_losses(a, x, y)))
    scaler.step(opt)
    scaler.update()
    GeometricMean()(_losses(b, x, y)).backward()
    plain.step()
    for p, q in zip(_params(a), _params(b), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
