"""The optimizer, its engines, gradient accumulation and the GradScaler path on CUDA.

The CUDA cases skip without CUDA. Each step on the GPU (float32) is compared with the same step in
float64 on the CPU; the autocast and GradScaler cases also run on the CPU (autocast to fp16/bf16
there too). ``JDOPTIM_TEST_DEVICE=cpu`` runs the CUDA cases on the CPU (to check the tests
themselves on a machine without a GPU).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import UPGrad

DEVICE = torch.device(os.environ.get("JDOPTIM_TEST_DEVICE", "cuda"))

needs_device = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="CUDA is not available"
)
# The autocast tests also run on the CPU, so that their CPU half guards every machine.
DEVICES = [
    pytest.param(DEVICE, id=DEVICE.type, marks=needs_device),
    pytest.param(torch.device("cpu"), id="cpu-autocast"),
]


def _model() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)]
    return nn.Sequential(*layers)


def _batch(step: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(12, 8, generator=g), torch.randn(12, 3, generator=g)
    return x.to(device, dtype), y.to(device, dtype)


CONFIGS = {
    "jacobian_task_losses": ({"path": "jacobian"}, "task", 1),
    "per_sample_engine": ({"batch_dim": 0}, "sample", 1),
    "layer_gramian_engine": ({"shared_params": "trunk"}, "task", 1),
    "accumulate_per_sample": ({"batch_dim": 0}, "sample", 3),
    "accumulate_mean": ({}, "task", 2),
}


def _run(config: str, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    options, kind, micro = CONFIGS[config]
    model = _model().to(device, dtype)
    options = dict(options)
    if options.get("shared_params") == "trunk":
        options["shared_params"] = [*model[0].parameters(), *model[2].parameters()]
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), UPGrad(), **options
    )

    def losses_of(x, y):
        squared = (model(x) - y) ** 2
        return squared.mean(dim=0) if kind == "task" else squared.sum(dim=1)

    for step in range(3):
        xs, ys = (t.chunk(micro) for t in _batch(step, device, dtype))
        opt.zero_grad()
        for i in range(micro):
            opt.backward(losses_of(xs[i], ys[i]), accumulate=i < micro - 1)
        assert all(p.grad.device == p.device for p in model.parameters())
        opt.step()
    return [p.detach() for p in model.parameters()]


@needs_device
@pytest.mark.parametrize("config", CONFIGS)
def test_steps_on_the_device_match_float64_on_the_cpu(config):
    got = _run(config, DEVICE, torch.float32)
    expected = _run(config, torch.device("cpu"), torch.float64)
    for g, e in zip(got, expected, strict=True):
        assert g.device.type == DEVICE.type
        torch.testing.assert_close(g.cpu().double(), e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_dim", [None, 0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grad_scaler_under_autocast_equals_the_unscaled_autocast_step(device, batch_dim, dtype):
    """``opt.backward(scaler.scale(losses)); scaler.step(opt)`` under autocast makes the step of
    the unscaled autocast losses (the scale only shifts exponents) and keeps fp32 parameters."""
    plain, scaled = _model().to(device), _model().to(device)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10, growth_interval=1)
    ref_opt = JacobianOptimizer(
        torch.optim.SGD(plain.parameters(), lr=0.05), UPGrad(), batch_dim=batch_dim
    )
    opt = JacobianOptimizer(
        torch.optim.SGD(scaled.parameters(), lr=0.05),
        UPGrad(),
        batch_dim=batch_dim,
        grad_scaler=scaler,
    )
    for step in range(3):
        x, y = _batch(step, device, torch.float32)
        for model, o in ((plain, ref_opt), (scaled, opt)):
            o.zero_grad()
            with torch.autocast(device.type, dtype=dtype):
                losses = ((model(x) - y) ** 2).float()
            losses = losses.mean(dim=0) if batch_dim is None else losses.sum(dim=1)
            if o is opt:
                o.backward(scaler.scale(losses))
                scaler.step(o)
                scaler.update()
            else:
                o.backward(losses)
                o.step()
        for a, b in zip(plain.parameters(), scaled.parameters(), strict=True):
            assert b.dtype == torch.float32
            torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-4)
    assert scaler.get_scale() > 2.0**10  # no overflow: the scale grew at every step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_dim", [None, 0])
def test_an_overflow_skips_the_step_and_lowers_the_scale(device, batch_dim):
    model = _model().to(device)
    before = copy.deepcopy(model)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        UPGrad(),
        batch_dim=batch_dim,
        grad_scaler=scaler,
    )
    x, y = _batch(0, device, torch.float32)
    losses = ((model(x) - y) ** 2).sum(dim=1) * torch.tensor(float("inf"), device=device)
    opt.backward(scaler.scale(losses if batch_dim == 0 else losses[:3]))
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**9
    for a, b in zip(before.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
