"""PCGrad against the paper's loop on the rows (float64 numpy), and its random-order contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jdoptim import JacobianOptimizer
from jdoptim.aggregation._bases import GramianWeightedAggregator
from jdoptim.aggregation._pcgrad import PCGrad, PCGradWeighting, random_orders
from tests.aggregation import _inputs


def paper_pcgrad(rows: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """Algorithm 1 of Yu et al. on the gradients themselves, with the given orders."""
    projected = []
    for i in range(rows.shape[0]):
        g = rows[i].copy()
        for j in orders[i]:
            inner = g @ rows[j]
            if inner < 0:
                g = g - inner / (rows[j] @ rows[j]) * rows[j]
        projected.append(g)
    return np.sum(projected, axis=0) if projected else np.zeros(rows.shape[1])


def orders_of(seed: int, m: int) -> np.ndarray:
    return random_orders(m, torch.Generator().manual_seed(seed)).numpy()


def test_orders_are_permutations_of_the_other_tasks():
    orders = orders_of(0, 6)
    for i, order in enumerate(orders):
        assert sorted(order.tolist()) == [j for j in range(6) if j != i]
    assert {tuple(orders_of(seed, 3)[0].tolist()) for seed in range(20)} == {(1, 2), (2, 1)}


@pytest.mark.parametrize(
    "rows",
    [
        _inputs.random(5, 7, 0),
        _inputs.conflicting(6, 4, 1),
        _inputs.duplicated(6, 3, 2),
        _inputs.rank_deficient(7, 5, 2, 3),
        np.concatenate([_inputs.conflicting(3, 4, 4), np.zeros((1, 4))]),
    ],
)
def test_matches_the_paper_loop(rows):
    for seed in range(3):
        expected = paper_pcgrad(rows, orders_of(seed, rows.shape[0]))
        actual = PCGrad(seed=seed)(torch.from_numpy(rows))
        np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_two_tasks_closed_form_and_non_conflicting():
    g1, g2 = np.array([1.0, 0.0, 2.0]), np.array([-2.0, 1.0, 0.5])
    expected = (g1 - (g1 @ g2) / (g2 @ g2) * g2) + (g2 - (g1 @ g2) / (g1 @ g1) * g1)
    J = torch.tensor(np.stack([g1, g2]))
    update = PCGrad()(J)
    np.testing.assert_allclose(update.numpy(), expected, rtol=1e-12)
    assert bool((J @ update >= 0).all())


def test_no_conflict_is_the_sum():
    J = torch.tensor(np.abs(_inputs.random(5, 6, 5)))
    assert torch.allclose(PCGrad()(J), J.sum(dim=0), rtol=1e-12, atol=0)


def test_gramian_path_and_weights():
    J = torch.from_numpy(_inputs.conflicting(5, 8, 6))
    aggregator = PCGrad(seed=3)
    assert isinstance(aggregator, GramianWeightedAggregator)
    weights = aggregator.weights_from_gramian(J @ J.T)
    aggregator.reset()
    assert torch.allclose(weights @ J, aggregator(J), rtol=1e-12, atol=1e-12)
    assert bool((weights >= 1 - 1e-12).all())  # projections only add the other rows


def test_random_order_matters_and_seed_reproduces():
    J = torch.from_numpy(_inputs.conflicting(6, 5, 7))
    outputs = {tuple(PCGrad(seed=s)(J).tolist()) for s in range(8)}
    assert len(outputs) > 1
    a, b = PCGrad(seed=11), PCGrad(seed=11)
    for _ in range(3):
        assert torch.equal(a(J), b(J))
    torch.manual_seed(0)
    c = PCGrad()
    torch.manual_seed(0)
    assert torch.equal(c(J), PCGrad()(J))


@pytest.mark.parametrize(("seed", "error"), [("1", TypeError), (1.5, TypeError), (True, TypeError)])
def test_bad_seed(seed, error):
    with pytest.raises(error, match="seed must be an int or None"):
        PCGradWeighting(seed)


def test_repr_and_edge_shapes():
    assert repr(PCGrad(seed=4)) == "PCGrad(seed=4)"
    assert PCGrad(seed=0)(torch.zeros(0, 3)).tolist() == [0.0, 0.0, 0.0]
    assert PCGrad(seed=0)(torch.ones(1, 2)).tolist() == [1.0, 1.0]


def test_usable_in_the_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), PCGrad(seed=0))
    x = torch.randn(4, 3)
    losses = optimizer.step(lambda: model(x).pow(2).mean(dim=0))
    assert losses.shape == (2,)
    assert "jdoptim" in optimizer.state_dict()
