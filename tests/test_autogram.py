"""``jdoptim.autogram.Engine``: Gramians vs ``torch.func.jacrev``, the IWRM step, validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from jdoptim.aggregation import UPGrad, UPGradWeighting
from jdoptim.autogram import Engine
from jdoptim.autojac import backward, jac_to_grad
from tests._autojac_cases import digits_model


class _Tied(nn.Module):
    """A weight also used outside its module (no closed form: the exact fallback runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(64, 64)
        self.out = nn.Linear(64, 1)

    def forward(self, x):
        h = torch.tanh(self.inner(x))
        return self.out(h + 0.1 * nn.functional.linear(h, self.inner.weight))


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x.view(-1, 1, 8, 8))).flatten(1))


def _model(kind: str, stage: str, dtype: torch.dtype):
    model, x, y = digits_model(stage, dtype)
    torch.manual_seed(1)
    if kind == "tied":
        model = _Tied().to(dtype)
    elif kind == "conv":
        model = _Conv().to(dtype)
    return model, x[:24], y[:24]


def _per_sample_losses(out, y):
    if out.shape[1] == 1:
        return (out.squeeze(1) - y.to(out.dtype)) ** 2
    return nn.functional.cross_entropy(out, y, reduction="none")


def _reference_gramian(model, x, y, loss_fn, names=None):
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params) if names is None else names

    def losses(sub):
        return loss_fn(functional_call(model, {**params, **sub}, (x,)), y).reshape(-1)

    jacobians = jacrev(losses)({k: params[k] for k in names})
    matrix = torch.cat([jacobians[k].flatten(1) for k in names], dim=1)
    return matrix @ matrix.T


def _tolerance(dtype):
    return {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-7, "atol": 1e-9}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize(
    ("kind", "stage"), [("mlp", "early"), ("mlp", "late"), ("tied", "early"), ("conv", "early")]
)
def test_gramian_of_per_sample_losses_matches_jacrev(kind, stage, batch_dim, dtype):
    model, x, y = _model(kind, stage, dtype)
    engine = Engine(model, batch_dim=batch_dim)
    losses = _per_sample_losses(model(x), y)
    gramian = engine.compute_gramian(losses)
    expected = _reference_gramian(model, x, y, _per_sample_losses)
    torch.testing.assert_close(gramian, expected, **_tolerance(dtype))
    losses.backward(torch.ones_like(losses))  # the graph is kept for the weighted backward


def test_iwrm_step_equals_backward_then_jac_to_grad_with_upgrad():
    # The equivalence the peer documents: Gramian -> weights -> losses.backward(weights) is the
    # same step as autojac.backward(losses) followed by jac_to_grad(params, UPGrad()).
    for kind in ["mlp", "tied"]:
        model, x, y = _model(kind, "late", torch.float64)
        engine = Engine(model, batch_dim=0)
        for _ in range(2):  # twice: the second call must keep the graph too
            losses = _per_sample_losses(model(x), y)
            losses.backward(UPGradWeighting()(engine.compute_gramian(losses)))
            via_gramian = [p.grad.clone() for p in model.parameters()]
            model.zero_grad()
            backward(_per_sample_losses(model(x), y))
            jac_to_grad(model.parameters(), UPGrad())
            for g, p in zip(via_gramian, model.parameters(), strict=True):
                torch.testing.assert_close(g, p.grad)
            model.zero_grad()


def test_partial_engine_and_module_arguments():
    model, x, y = _model("mlp", "late", torch.float64)
    losses_fn = _per_sample_losses
    last = _reference_gramian(model, x, y, losses_fn, names=["2.weight", "2.bias"])
    for modules in [(model[2],), (model[2:],), (model[2:].modules(),), (model[2:], model[2])]:
        engine = Engine(*modules, batch_dim=0)
        gramian = engine.compute_gramian(losses_fn(model(x), y))
        torch.testing.assert_close(gramian, last)  # each parameter counted once
        del engine
    model[0].weight.requires_grad_(False)  # frozen parameters are not columns
    names = ["0.bias", "2.weight", "2.bias"]
    expected = _reference_gramian(model, x, y, losses_fn, names=names)
    engine = Engine(model, batch_dim=0)
    torch.testing.assert_close(engine.compute_gramian(losses_fn(model(x), y)), expected)


@pytest.mark.parametrize("batch_dim", [0, 1, None])
def test_a_matrix_output_gives_the_gramian_of_its_flattened_values(batch_dim):
    model, x, y = _model("mlp", "early", torch.float64)
    weights = torch.tensor([1.0, 3.0], dtype=torch.float64)

    def task_losses(out, y):  # [24, 2]: two losses per sample
        per_sample = nn.functional.cross_entropy(out, y, reduction="none")
        matrix = per_sample[:, None] * weights + out[:, :2] ** 2
        return matrix if batch_dim != 1 else matrix.T

    engine = Engine(model, batch_dim=batch_dim)
    gramian = engine.compute_gramian(task_losses(model(x), y))
    assert gramian.shape == (48, 48)
    torch.testing.assert_close(gramian, _reference_gramian(model, x, y, task_losses))


def test_scalar_output_and_an_output_that_ignores_the_modules():
    model, x, y = _model("mlp", "early", torch.float64)
    engine = Engine(model, batch_dim=None)
    loss = _per_sample_losses(model(x), y).mean()
    gramian = engine.compute_gramian(loss)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(gramian, sum(g.pow(2).sum() for g in grads).reshape(1, 1))
    other = nn.Linear(64, 1).double()
    unrelated = Engine(other, batch_dim=0)
    torch.testing.assert_close(
        unrelated.compute_gramian(_per_sample_losses(model(x), y)),
        torch.zeros(24, 24, dtype=torch.float64),
    )


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda m: Engine(batch_dim=0), ValueError, "at least one module"),
        (lambda m: Engine(m, 3, batch_dim=0), TypeError, r"modules\[1\] is a int"),
        (lambda m: Engine(m, batch_dim="0"), TypeError, "batch_dim must be an int"),
        (lambda m: Engine(m, batch_dim=True), TypeError, "batch_dim must be an int"),
    ],
)
def test_constructor_validation(make, error, match):
    with pytest.raises(error, match=match):
        make(nn.Linear(2, 1))


def test_compute_gramian_validation():
    model = nn.Linear(3, 1)
    engine = Engine(model, batch_dim=1)
    out = model(torch.randn(4, 3)).squeeze(1)
    with pytest.raises(ValueError, match=r"batch_dim=1 is not a dimension of output \(shape"):
        engine.compute_gramian(out)
    with pytest.raises(ValueError, match="does not require grad"):
        engine.compute_gramian(out.detach())
    with pytest.raises(ValueError, match="no element"):
        engine.compute_gramian(out[:0])
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor"):
        engine.compute_gramian([out])


def test_the_forward_hooks_are_per_module_and_go_away_with_the_engine_without_a_gc_pass():
    from torch.nn.modules import module as torch_module

    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1))
    unrelated = nn.Linear(3, 1)
    global_before = len(torch_module._global_forward_hooks)
    engine = Engine(model[2], batch_dim=0)
    assert len(torch_module._global_forward_hooks) == global_before  # no process-wide hook
    assert len(model[2]._forward_hooks) == 1
    assert len(model[0]._forward_hooks) == len(unrelated._forward_hooks) == 0  # not owned
    engine.compute_gramian(model(torch.randn(4, 3)).squeeze(1))
    del engine  # reference counting alone must free it: no cycle through the engine
    assert len(model[2]._forward_hooks) == 0
