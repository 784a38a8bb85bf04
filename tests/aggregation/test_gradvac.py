"""GradVac against the paper's loop on the rows (float64 numpy), over several steps; its state."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from jdoptim.aggregation._gradvac import GradVac, GradVacWeighting
from jdoptim.aggregation._pcgrad import PCGrad, random_orders
from tests.aggregation import _inputs


def paper_gradvac(rows, orders, targets, beta, eps):
    """Algorithm 2 of Wang et al. on the gradients themselves; returns (update, new targets)."""
    targets = targets.copy()
    modified = []
    for i in range(rows.shape[0]):
        g = rows[i].copy()
        for j in orders[i]:
            phi = (g @ rows[j]) / (np.linalg.norm(g) * np.linalg.norm(rows[j]))
            target = targets[i, j]
            if phi < target:
                numerator = target * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - target**2)
                denominator = np.linalg.norm(rows[j]) * (np.sqrt(1 - target**2) + eps)
                g = g + np.linalg.norm(g) * numerator / denominator * rows[j]
            targets[i, j] = (1 - beta) * target + beta * phi
        modified.append(g)
    return np.sum(modified, axis=0), targets


@pytest.mark.parametrize("beta", [0.5, 0.01, 1.0])
@pytest.mark.parametrize("eps", [1e-8, 0.0, 0.1])
def test_matches_the_paper_loop_over_steps(beta, eps):
    seed, m, n = 4, 5, 6
    generator = torch.Generator().manual_seed(seed)
    aggregator = GradVac(beta=beta, eps=eps, seed=seed)
    targets = np.zeros((m, m))
    for step in range(4):
        rows = _inputs.conflicting(m, n, step) * 10.0 ** (step - 2)
        expected, targets = paper_gradvac(
            rows, random_orders(m, generator).numpy(), targets, beta, eps
        )
        actual = aggregator(torch.from_numpy(rows))
        scale = np.abs(rows).max()
        np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-9, atol=1e-9 * scale)
        np.testing.assert_allclose(
            aggregator.gramian_weighting.get_extra_state()["targets"].numpy(), targets, atol=1e-9
        )


def test_first_step_is_pcgrad():
    J = torch.from_numpy(_inputs.conflicting(6, 5, 1))
    assert torch.allclose(GradVac(eps=0.0, seed=2)(J), PCGrad(seed=2)(J), rtol=1e-10, atol=1e-12)


def test_two_tasks_reach_the_target_cosine():
    J = torch.tensor([[1.0, 0.2, 0.0], [0.3, 1.0, -0.5]], dtype=torch.float64)
    weighting = GradVacWeighting(beta=1.0, eps=0.0, seed=0)
    weighting(J @ J.T)  # targets := current cosine 0.34 between the rows
    target = float(weighting.get_extra_state()["targets"][0, 1])
    rotated = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    weights = weighting(rotated @ rotated.T)  # cosine 0 < target: pulled up to it
    g1 = rotated[0] + (weights[1] - 1) * rotated[1]  # weights = (1 + w_21, 1 + w_12), w_12 = w_21
    cosine = g1 @ rotated[1] / (g1.norm() * rotated[1].norm())
    assert abs(float(cosine) - target) < 1e-12


def test_scale_does_not_change_the_behaviour():
    """ε only enters a dimensionless term: tiny and huge gradients give the scaled update."""
    rows = _inputs.conflicting(5, 4, 2)
    outputs = []
    for scale in (1e-8, 1.0, 1e8):
        aggregator = GradVac(seed=1)
        for _ in range(3):
            update = aggregator(torch.from_numpy(rows * scale)) / scale
        outputs.append(update)
    for update in outputs[1:]:
        assert torch.allclose(update, outputs[0], rtol=1e-6, atol=1e-6)


def test_zero_row_is_skipped_and_target_kept():
    rows = np.concatenate([_inputs.conflicting(3, 4, 3), np.zeros((1, 4))])
    aggregator = GradVac(seed=0)
    update = aggregator(torch.from_numpy(rows))
    targets = aggregator.gramian_weighting.get_extra_state()["targets"]
    assert torch.equal(targets[3], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(targets[:, 3], torch.zeros(4, dtype=torch.float64))
    without = GradVac(seed=0)
    assert bool(torch.isfinite(update).all())
    assert update.shape == without(torch.from_numpy(rows[:3])).shape


def test_state_before_and_after_the_first_call_loads_into_a_fresh_instance():
    J = torch.from_numpy(_inputs.conflicting(4, 5, 5))
    aggregator = GradVac(seed=7)
    initial = copy.deepcopy(aggregator.state_dict())
    assert initial["gramian_weighting._extra_state"]["targets"] is None
    first = aggregator(J)
    saved = copy.deepcopy(aggregator.state_dict())
    expected = [aggregator(J) for _ in range(3)]
    for state, outputs in ((initial, [first, *expected]), (saved, expected)):
        fresh = GradVac(seed=99)
        fresh.load_state_dict(state)
        assert all(torch.equal(fresh(J), e) for e in outputs)
    aggregator.reset()
    assert aggregator.gramian_weighting.get_extra_state()["targets"] is None
    assert torch.equal(aggregator(J), first)


def test_bad_state_and_changing_number_of_rows():
    aggregator = GradVac(seed=0)
    weighting = aggregator.gramian_weighting
    with pytest.raises(KeyError, match="missing keys"):
        weighting.set_extra_state({"targets": None})
    with pytest.raises(ValueError, match="square matrix"):
        rng = weighting.get_extra_state()["rng"]
        weighting.set_extra_state({"targets": torch.zeros(3), "rng": rng})
    aggregator(torch.eye(3))
    with pytest.raises(ValueError, match="targets are for 3 tasks but got 4 rows"):
        aggregator(torch.eye(4))
    aggregator.reset()
    assert aggregator(torch.eye(4)).shape == (4,)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"beta": 1.5}, ValueError, r"beta must be in \[0.0, 1.0\], got 1.5"),
        ({"beta": -0.1}, ValueError, "beta must be in"),
        ({"beta": "0.5"}, TypeError, "beta must be a number, got str"),
        ({"eps": -1e-8}, ValueError, "eps must be in"),
        ({"eps": float("nan")}, ValueError, "eps must be in"),
        ({"seed": 0.5}, TypeError, "seed must be an int or None"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradVac(**kwargs)


def test_repr():
    assert repr(GradVac(seed=3)) == "GradVac(beta=0.5, eps=1e-08, seed=3)"
