"""Aggregators as ``nn.Module``: hooks, nesting, checkpoints, ``.to()``, no graph, hyper-params."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import (
    MGDA,
    PCD,
    CAGrad,
    GradDrop,
    GradVac,
    GramianWeightedAggregator,
    Krum,
    TrimmedMean,
    UPGrad,
)
from jdoptim.linalg import ExactProjector, QuadprogProjector
from tests.aggregation import _inputs
from tests.aggregation._table import AGGREGATORS_UNDER_TEST, Entry
from tests.aggregation.test_krum import brute_force_krum, honest_and_byzantine


def _recorder(store: list) -> object:
    return lambda module, args, output: store.append((args[0].clone(), output.clone()))


def _two_task_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    return model, torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)


def test_monitoring_recipe_sees_the_jacobian_the_gramian_and_the_weights():
    """TorchJD's recipe: a hook on the aggregator and one on its ``gramian_weighting``."""
    model, x, y = _two_task_model()
    aggregator = UPGrad()
    seen_by_aggregator, seen_by_weighting = [], []
    aggregator.register_forward_hook(_recorder(seen_by_aggregator))
    aggregator.gramian_weighting.register_forward_hook(_recorder(seen_by_weighting))
    params = dict(model.named_parameters())

    def losses_of(p: dict[str, torch.Tensor]) -> torch.Tensor:
        out = torch.func.functional_call(model, p, (x,))
        return ((out - y) ** 2).mean(dim=0)

    jacobian = torch.func.jacrev(losses_of)({k: v.detach() for k, v in params.items()})
    J = torch.cat([jacobian[k].reshape(2, -1) for k in params], dim=1)  # independent J
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), aggregator)
    opt.step(lambda: losses_of(params))
    ((matrix, update),) = seen_by_aggregator
    ((gramian, weights),) = seen_by_weighting
    torch.testing.assert_close(matrix, J, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gramian, J @ J.T, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(update, weights @ J, rtol=1e-12, atol=1e-14)
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(grads, update, rtol=1e-12, atol=1e-14)


def test_weighting_hook_fires_on_the_per_sample_gramian_engine():
    model, x, y = _two_task_model()
    aggregator = UPGrad()
    seen = []
    aggregator.gramian_weighting.register_forward_hook(_recorder(seen))
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator, batch_dim=0)
    opt.step(lambda: ((model(x) - y) ** 2).sum(dim=1))
    ((gramian, weights),) = seen
    assert gramian.shape == (16, 16) and weights.shape == (16,)
    assert bool((gramian @ weights >= -1e-10 * gramian.diagonal().max()).all())  # UPGrad's check


def test_hooks_can_be_removed_and_then_the_gramian_path_is_taken_again():
    aggregator = UPGrad()
    handle = aggregator.register_forward_hook(lambda *_: None)
    assert aggregator.observes_matrix
    handle.remove()
    assert not aggregator.observes_matrix


class _Net(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.aggregator = GradVac(seed=seed)


def test_nested_in_a_model_the_state_travels_in_its_checkpoint():
    J = torch.from_numpy(_inputs.conflicting(4, 6, 2))
    net = _Net(seed=0)
    for _ in range(3):
        net.aggregator(J)
    assert "aggregator.gramian_weighting._extra_state" in net.state_dict()
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    fresh = _Net(seed=123)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(3):
        assert torch.equal(fresh.aggregator(J), net.aggregator(J))


def test_a_load_that_raises_changes_nothing():
    J = torch.from_numpy(_inputs.conflicting(3, 5, 1))
    aggregator = GradVac(seed=0)
    aggregator(J)
    before = copy.deepcopy(aggregator.state_dict())
    key = "gramian_weighting._extra_state"
    bad = {key: {**before[key], "targets": torch.zeros(3)}}  # not square
    with pytest.raises(ValueError, match="square matrix"):
        aggregator.load_state_dict(bad)
    twin = GradVac(seed=1)
    twin.load_state_dict(before)
    assert torch.equal(aggregator(J), twin(J))


def test_to_returns_the_module_and_moves_nothing():
    J = torch.from_numpy(_inputs.conflicting(4, 5, 3))
    aggregator = PCD()
    aggregator(J)
    state = copy.deepcopy(aggregator.state_dict())
    assert aggregator.to(torch.float32) is aggregator and aggregator.to("cpu") is aggregator
    assert list(aggregator.parameters()) == [] and list(aggregator.buffers()) == []
    twin = PCD()
    twin.load_state_dict(state)
    assert torch.equal(aggregator(J), twin(J))  # the float64 state was not cast


@pytest.mark.parametrize("entry", AGGREGATORS_UNDER_TEST, ids=str)
def test_outputs_do_not_require_grad(entry: Entry):
    J = torch.from_numpy(_inputs.conflicting(5, 4, 0)).requires_grad_()
    aggregator = entry.make(5)
    assert not aggregator(J).requires_grad
    if isinstance(aggregator, GramianWeightedAggregator):
        assert not aggregator.weights_from_gramian(J @ J.T).requires_grad
        assert not aggregator.weighting(J).requires_grad


@pytest.mark.parametrize(
    ("make", "name", "bad", "error", "good", "reference"),
    [
        (lambda: UPGrad(), "pref_vector", torch.ones(2, 2), ValueError, torch.tensor([0.2] * 5),
         lambda: UPGrad(torch.tensor([0.2] * 5))),
        (lambda: UPGrad(), "projector", 3, TypeError, QuadprogProjector(),
         lambda: UPGrad(projector=QuadprogProjector())),
        (lambda: Krum(1), "n_selected", 0, ValueError, 2, lambda: Krum(1, 2)),
        (lambda: Krum(1), "n_byzantine", -1, ValueError, 2, lambda: Krum(2)),
        (lambda: CAGrad(0.5), "c", -1.0, ValueError, 1.0, lambda: CAGrad(1.0)),
        (lambda: MGDA(), "epsilon", 0.0, ValueError, 0.1, lambda: MGDA(epsilon=0.1)),
        (lambda: TrimmedMean(1), "trim_number", 1.5, TypeError, 2, lambda: TrimmedMean(2)),
        (lambda: GradDrop(seed=0), "leak", [0.1], TypeError, torch.full((5,), 0.5),
         lambda: GradDrop(leak=torch.full((5,), 0.5), seed=0)),
    ],
)  # fmt: skip
def test_hyper_parameters_validate_on_assignment_and_reach_the_weighting(
    make, name, bad, error, good, reference
):
    J = torch.from_numpy(_inputs.conflicting(5, 6, 4))
    aggregator = make()
    old = getattr(aggregator, name)
    with pytest.raises(error, match=name):
        setattr(aggregator, name, bad)
    assert getattr(aggregator, name) is old  # the failed assignment kept the old value
    setattr(aggregator, name, good)
    owner = getattr(aggregator, "gramian_weighting", aggregator)
    assert getattr(owner, name) is getattr(aggregator, name)
    torch.testing.assert_close(aggregator(J), reference()(J), rtol=0, atol=0)


def test_projector_default_is_exact_and_any_callable_is_accepted():
    J = torch.from_numpy(_inputs.conflicting(6, 8, 5))
    assert isinstance(UPGrad().projector, ExactProjector)
    calls = []

    def counting(U: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        calls.append(U.shape)
        return ExactProjector()(U, G)

    assert torch.equal(UPGrad(projector=counting)(J), UPGrad()(J)) and calls == [(6, 6)]


@pytest.mark.parametrize(("m", "f"), [(4, 1), (5, 2), (6, 2), (6, 3), (9, 6)])
def test_krum_below_the_papers_bound_is_computed_as_defined(m, f):
    """``f + 3 <= m <= 2f + 2``: accepted (as TorchJD), the scores from the rows themselves."""
    for seed in range(3):
        J = honest_and_byzantine(m, f, 5, seed)
        for k in (1, 2):
            expected = brute_force_krum(J.numpy(), f, k)
            np.testing.assert_allclose(Krum(f, k)(J).numpy(), expected, atol=1e-12)
    with pytest.raises(ValueError, match=f"at least {f} \\+ 3 = {f + 3} rows"):
        Krum(f)(torch.randn(f + 2, 3, dtype=torch.float64))
