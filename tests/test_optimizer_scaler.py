"""``JacobianOptimizer`` under ``torch.amp.GradScaler`` (contract items 19-21), on the CPU.

The optimizer is given the scaler: it unscales the Jacobian before aggregating, so the two-phase
step ``opt.backward(scaler.scale(losses)); scaler.step(opt); scaler.update()`` equals the fp32
step for every aggregator, positively homogeneous or not.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import MGDA, Mean, UPGrad


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3))


def _losses(model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(10, 3, generator=g), torch.randn(10, 3, generator=g)
    return (model(x) - y).pow(2).mean(dim=0)


def _non_homogeneous(matrix: torch.Tensor) -> torch.Tensor:
    return matrix.mean(dim=0) / (1 + matrix.norm())


AGGREGATORS = {
    "upgrad": UPGrad,
    "mgda": MGDA,
    "mean": Mean,
    "non_homogeneous_callable": lambda: _non_homogeneous,
}

INNERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
}


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_the_non_homogeneous_aggregator_really_is_not_homogeneous():
    j = torch.randn(3, 5)
    assert not torch.allclose(_non_homogeneous(1024 * j), 1024 * _non_homogeneous(j))


@pytest.mark.parametrize("inner", INNERS)
@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_item20_scaled_two_phase_step_equals_the_fp32_step(aggregator, inner):
    fp32, scaled = _model(), _model()
    ref_opt = JacobianOptimizer(INNERS[inner](fp32.parameters()), AGGREGATORS[aggregator]())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    opt = JacobianOptimizer(
        INNERS[inner](scaled.parameters()), AGGREGATORS[aggregator](), grad_scaler=scaler
    )
    scales = []
    for _ in range(4):
        ref_opt.zero_grad()
        ref_opt.backward(_losses(fp32))
        ref_opt.step()

        opt.zero_grad()
        out = opt.backward(scaler.scale(_losses(scaled)))
        scales.append(scaler.get_scale())
        torch.testing.assert_close(out, scales[-1] * _losses(scaled).detach())
        scaler.step(opt)
        scaler.update()
        for a, b in zip(_params(fp32), _params(scaled), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert len(set(scales)) > 1  # the scale grew during the run: several scales were exercised


@pytest.mark.parametrize("aggregator", ["upgrad", "mgda", "mean"])
def test_item20_homogeneous_aggregators_are_exact_even_without_grad_scaler_argument(aggregator):
    """``A(sJ) = s A(J)``: the scaled ``.grad`` unscales to the fp32 one with no help."""
    fp32, scaled = _model(), _model()
    ref_opt = JacobianOptimizer(
        torch.optim.Adam(fp32.parameters(), lr=0.01), AGGREGATORS[aggregator]()
    )
    opt = JacobianOptimizer(
        torch.optim.Adam(scaled.parameters(), lr=0.01), AGGREGATORS[aggregator]()
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for _ in range(3):
        ref_opt.zero_grad()
        ref_opt.backward(_losses(fp32))
        ref_opt.step()
        opt.zero_grad()
        opt.backward(scaler.scale(_losses(scaled)))
        scaler.step(opt)
        scaler.update()
        for a, b in zip(_params(fp32), _params(scaled), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_item19_fused_inner_sgd_gets_unscaled_gradients():
    """A fused inner SGD must not make GradScaler skip unscaling (a step 2**10 too big)."""
    fp32, scaled = _model(), _model()
    try:
        inner = torch.optim.SGD(scaled.parameters(), lr=0.1, fused=True)
    except RuntimeError as error:  # pragma: no cover - depends on the build
        pytest.skip(f"fused SGD unavailable on this build: {error}")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = JacobianOptimizer(inner, UPGrad(), grad_scaler=scaler)
    ref_opt = JacobianOptimizer(torch.optim.SGD(fp32.parameters(), lr=0.1), UPGrad())
    ref_opt.step(lambda: _losses(fp32))
    opt.backward(scaler.scale(_losses(scaled)))
    scaler.step(opt)
    scaler.update()
    for a, b in zip(_params(fp32), _params(scaled), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_item21_scaler_step_with_a_closure_raises_gradscalers_own_error():
    model = _model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), grad_scaler=scaler
    )
    before = _params(model)
    with pytest.raises(RuntimeError, match="Closure use is not currently supported"):
        scaler.step(opt, closure=lambda: scaler.scale(_losses(model)))
    for a, b in zip(before, _params(model), strict=True):
        assert torch.equal(a, b)
    doc = JacobianOptimizer.__doc__
    assert "scaler.step(opt)" in doc and ":meth:`backward`" in doc  # docs point to two phases


@pytest.mark.parametrize("aggregator", AGGREGATORS)
@pytest.mark.parametrize(
    "overflow",
    ["huge_scale", "inf_loss", "nan_loss"],
)
def test_overflow_skips_the_step_and_lowers_the_scale(aggregator, overflow):
    model = _model()
    init_scale = 2.0**127 if overflow == "huge_scale" else 2.0**8
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        AGGREGATORS[aggregator](),
        grad_scaler=scaler,
    )
    before = _params(model)
    losses = _losses(model)
    if overflow == "huge_scale":  # same values, a steep slope: the scaled Jacobian overflows
        w = model[0].weight
        losses = losses + 8.0 * (w.sum() - w.sum().detach())
    elif overflow == "inf_loss":
        losses = torch.cat([losses[:2], torch.exp(1e4 * losses[2:])])  # inf loss, inf gradient
    elif overflow == "nan_loss":
        losses = losses * torch.tensor([1.0, float("nan"), 1.0])
    scaled = scaler.scale(losses)
    if overflow == "huge_scale":
        assert bool(torch.isfinite(scaled).all())  # the losses fit, their Jacobian does not
    opt.backward(scaled)
    scaler.step(opt)
    scaler.update()
    for a, b in zip(before, _params(model), strict=True):
        assert torch.equal(a, b)
    assert len(opt.state) == 0 or all(
        s.get("momentum_buffer") is None for s in opt.state.values()
    )  # the inner step did not run
    assert scaler.get_scale() == init_scale * scaler.get_backoff_factor()

    # The next step, at the lowered scale, works and equals the fp32 step.
    fp32 = _model()
    ref_opt = JacobianOptimizer(
        torch.optim.SGD(fp32.parameters(), lr=0.1, momentum=0.9), AGGREGATORS[aggregator]()
    )
    ref_opt.step(lambda: _losses(fp32))
    opt.zero_grad()
    opt.backward(scaler.scale(_losses(model)))
    scaler.step(opt)
    scaler.update()
    for a, b in zip(_params(fp32), _params(model), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def _per_sample_losses(model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g)
    return (model(x) - y).pow(2).mean(dim=1)  # loss i depends on sample i only


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_item20_per_sample_engine_under_a_scaler_equals_the_fp32_jacobian_step(aggregator):
    """``batch_dim=0`` (closed-form Gramians) under a GradScaler matches the plain fp32 step."""
    fp32, scaled = _model(), _model()
    ref_opt = JacobianOptimizer(
        torch.optim.SGD(fp32.parameters(), lr=0.1), AGGREGATORS[aggregator]()
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = JacobianOptimizer(
        torch.optim.SGD(scaled.parameters(), lr=0.1),
        AGGREGATORS[aggregator](),
        grad_scaler=scaler,
        batch_dim=0,
    )
    for _ in range(2):
        ref_opt.zero_grad()
        ref_opt.backward(_per_sample_losses(fp32))
        ref_opt.step()
        opt.zero_grad()
        opt.backward(scaler.scale(_per_sample_losses(scaled)))
        scaler.step(opt)
        scaler.update()
        for a, b in zip(_params(fp32), _params(scaled), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)

    # Overflow through the per-sample path: skipped step, lower scale.
    before, scale = _params(scaled), scaler.get_scale()
    opt.zero_grad()
    opt.backward(scaler.scale(_per_sample_losses(scaled) * torch.tensor(float("inf"))))
    scaler.step(opt)
    scaler.update()
    for a, b in zip(before, _params(scaled), strict=True):
        assert torch.equal(a, b)
    assert scaler.get_scale() == scale * scaler.get_backoff_factor()


# Routes of the path under fp16 autocast; the layer-Gramian engine's autocast support is the
# engine's (issue 13, "dtypes"), tested with that engine.
FP16_ROUTES = {
    "jacobian": ({}, False),
    "samples": ({"batch_dim": 0}, False),
    "accumulated_jacobian_mean": ({}, True),
    "accumulated_samples_concat": ({"batch_dim": 0}, True),
}


def _fp16_losses(model: nn.Module, rows: slice, half: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(8, 3, generator=g)[rows], torch.randn(8, 3, generator=g)[rows]
    with torch.autocast("cpu", dtype=torch.float16):
        losses = (model(x).float() - y).pow(2).sum(dim=1)  # one loss per sample
    return losses.half() if half else losses


def _fp16_step(route: str, half: bool, scaler: torch.amp.GradScaler) -> nn.Module:
    kwargs, split = FP16_ROUTES[route]
    model = _model()
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), grad_scaler=scaler, **kwargs
    )
    if split:  # two micro-batches of 4 samples (same size: "mean" averages them)
        opt.backward(scaler.scale(_fp16_losses(model, slice(0, 4), half)), accumulate=True)
        opt.backward(scaler.scale(_fp16_losses(model, slice(4, 8), half)))
    else:
        opt.backward(scaler.scale(_fp16_losses(model, slice(None), half)))
    scaler.step(opt)
    scaler.update()
    return model


@pytest.mark.parametrize("half", [False, True], ids=["fp32_losses", "fp16_losses"])
@pytest.mark.parametrize("route", FP16_ROUTES)
def test_fp16_autocast_with_a_grad_scaler_equals_the_unscaled_step(route, half):
    """Power-of-two scaling is exact in fp16 (no overflow here): the scaled step is the same."""
    plain = _fp16_step(route, half, torch.amp.GradScaler("cpu", enabled=False))
    scaled = _fp16_step(route, half, torch.amp.GradScaler("cpu", init_scale=2.0**12))
    for a, b in zip(_params(plain), _params(scaled), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8)
    assert any(
        not torch.equal(a, b) for a, b in zip(_params(_model()), _params(scaled), strict=True)
    )


@pytest.mark.parametrize("route", FP16_ROUTES)
def test_fp16_overflow_skips_the_step_on_every_route(route):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)  # fp16 gradients overflow
    model = _fp16_step(route, True, scaler)
    for a, b in zip(_params(_model()), _params(model), strict=True):
        assert torch.equal(a, b)
    assert scaler.get_scale() == 2.0**24 * scaler.get_backoff_factor()
