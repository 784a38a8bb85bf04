"""CRMOGMWeighting: the moving-average recurrence, its state, and its composition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jdoptim.aggregation._bases import GramianWeightedAggregator, WeightedAggregator, Weighting
from jdoptim.aggregation._constant import ConstantWeighting, MeanWeighting
from jdoptim.aggregation._crmogm import CRMOGMWeighting
from jdoptim.aggregation._mgda import MGDAWeighting
from jdoptim.aggregation._modo import MoDoWeighting


class Scripted(Weighting):
    """Return the next of a list of weight vectors, whatever the input (stateless for the test)."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.outputs = outputs
        self.calls = 0

    def forward(self, stat: torch.Tensor, /) -> torch.Tensor:
        self.calls += 1
        return self.outputs[self.calls - 1].to(stat.dtype)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("initial", [None, [0.7, 0.1, 0.2]])
def test_recurrence_against_a_loop(alpha, initial):
    rng = np.random.default_rng(0)
    outputs = [rng.random(3) for _ in range(5)]
    initial_weights = None if initial is None else torch.tensor(initial, dtype=torch.float64)
    weighting = CRMOGMWeighting(
        Scripted([torch.from_numpy(o) for o in outputs]), alpha, initial_weights
    )
    previous = np.full(3, 1 / 3) if initial is None else np.array(initial)
    for output in outputs:
        previous = alpha * previous + (1 - alpha) * output
        np.testing.assert_allclose(weighting(torch.eye(3, dtype=torch.float64)).numpy(), previous)


def test_composes_with_both_aggregator_kinds():
    J = torch.randn(3, 5, dtype=torch.float64)
    gramian_based = GramianWeightedAggregator(CRMOGMWeighting(MGDAWeighting(), alpha=0.5))
    expected_weights = 0.5 * torch.full((3,), 1 / 3, dtype=torch.float64)
    expected_weights += 0.5 * MGDAWeighting()(J @ J.T)
    assert torch.allclose(gramian_based(J), expected_weights @ J, atol=1e-12)
    matrix_based = WeightedAggregator(CRMOGMWeighting(MeanWeighting()))
    assert torch.allclose(matrix_based(J), J.mean(dim=0), atol=1e-15)


def test_state_round_trip_with_a_stateful_inner_weighting():
    crosses = [torch.randn(4, 4, dtype=torch.float64) for _ in range(6)]
    first = CRMOGMWeighting(MoDoWeighting(gamma=0.2), alpha=0.7)
    for c in crosses[:3]:
        first(c)
    state = first.state_dict()  # torch's layout: each module's state under its own key
    assert set(state) == {"_extra_state", "weighting._extra_state"}
    assert set(state["_extra_state"]) == {"average"}
    assert set(state["weighting._extra_state"]) == {"lambda"}
    fresh = CRMOGMWeighting(MoDoWeighting(gamma=0.2), alpha=0.7)
    fresh.load_state_dict(state)
    for c in crosses[3:]:
        assert torch.equal(first(c), fresh(c))


def test_reset_clears_both_states():
    weighting = CRMOGMWeighting(MoDoWeighting(), alpha=0.5)
    weighting(torch.eye(2))
    weighting.reset()
    assert weighting.state_dict() == {
        "_extra_state": {"average": None},
        "weighting._extra_state": {"lambda": None},
    }


def test_strict_loading():
    weighting = CRMOGMWeighting(MeanWeighting())
    weighting(torch.eye(2))
    saved = weighting.get_extra_state()
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"_extra_state\""):
        weighting.load_state_dict({})
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"weighting"):
        weighting.load_state_dict({"_extra_state": {"average": None}, "weighting._extra_state": 1})
    with pytest.raises(KeyError, match="missing keys"):
        weighting.load_state_dict({"_extra_state": {}})
    with pytest.raises(ValueError, match="1-D"):
        weighting.load_state_dict({"_extra_state": {"average": torch.zeros(2, 2)}})
    assert torch.equal(weighting.get_extra_state()["average"], saved["average"])  # unchanged


def test_changing_m():
    weighting = CRMOGMWeighting(ConstantWeighting(torch.tensor([1.0, 0.0, 0.0])), alpha=0.5)
    weighting(torch.eye(3))
    weighting.weighting = ConstantWeighting(torch.tensor([1.0, 0.0]))
    assert torch.allclose(weighting(torch.eye(2)), torch.tensor([0.75, 0.25]))  # restart
    pinned = CRMOGMWeighting(MeanWeighting(), initial_weights=torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="initial_weights has 2 entries but got 3 rows"):
        pinned(torch.eye(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "J",
    [torch.zeros(5, 4), torch.randn(1, 3), torch.randn(256, 30) * 1e8, torch.zeros(5, 0)],
    ids=["zero", "one-row", "m256-huge", "no-columns"],
)
def test_finite_output(J, dtype):
    J = J.to(dtype)
    aggregator = GramianWeightedAggregator(CRMOGMWeighting(MGDAWeighting()))
    update = aggregator(J)
    assert update.dtype == dtype and update.shape == (J.shape[1],)
    assert bool(torch.isfinite(update).all())


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((MeanWeighting(), 1.5), ValueError),
        ((MeanWeighting(), -0.1), ValueError),
        ((MeanWeighting(), float("nan")), ValueError),
        ((MeanWeighting(), "0.9"), TypeError),
        ((lambda g: g, 0.9), TypeError),
        ((MeanWeighting(), 0.9, [0.5, 0.5]), TypeError),
        ((MeanWeighting(), 0.9, torch.ones(2, 2)), ValueError),
        ((MeanWeighting(), 0.9, torch.tensor([1.0, float("inf")])), ValueError),
    ],
)
def test_bad_constructor_arguments(args, error):
    with pytest.raises(error):
        CRMOGMWeighting(*args)


def test_repr():
    assert repr(CRMOGMWeighting(MGDAWeighting(), 0.5)) == (
        "CRMOGMWeighting(MGDAWeighting(epsilon=0.001, max_iters=100), alpha=0.5, "
        "initial_weights=None)"
    )
