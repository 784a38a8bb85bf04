"""The random aggregators' generator: seeding, fresh draws, state round trip, reset.

PCGrad and GradVac (random orders), GradDrop (random masks) and Random (random weights) share one
contract: the same seed gives the same sequence of outputs, each call draws afresh, the
generator state saved by ``state_dict`` reproduces the next outputs in a fresh instance built
with another seed (strictly: unknown or missing keys raise), ``reset`` restarts the sequence, and
without a seed the generator is drawn from torch's global one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

from jdoptim.aggregation import Aggregator, GradDrop, GradVac, PCGrad, Random
from tests.aggregation import _inputs

SEEDED: dict[str, Callable[..., Aggregator]] = {
    "PCGrad": PCGrad,
    "GradVac": GradVac,
    "GradDrop": GradDrop,
    "Random": Random,
}


@pytest.mark.parametrize("name", list(SEEDED))
def test_seed_fresh_draws_state_round_trip_and_reset(name: str) -> None:
    make = SEEDED[name]
    j = torch.from_numpy(_inputs.conflicting(6, 25, 8))
    a, b = make(seed=11), make(seed=11)
    outputs = [a(j) for _ in range(4)]
    assert all(torch.equal(b(j), o) for o in outputs)
    assert len({tuple(o.tolist()) for o in outputs}) > 1  # fresh draws per call
    saved = copy.deepcopy(a.state_dict())
    expected = [a(j) for _ in range(2)]
    fresh = make(seed=99)
    fresh.load_state_dict(saved)
    assert all(torch.equal(fresh(j), e) for e in expected)
    a.reset()
    assert torch.equal(a(j), outputs[0])
    torch.manual_seed(0)
    unseeded = make()
    torch.manual_seed(0)
    assert torch.equal(unseeded(j), make()(j))
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"extra\""):
        fresh.load_state_dict({**saved, "extra": 1})
    with pytest.raises(
        RuntimeError, match=r"Missing key\(s\) in state_dict: \"[a-z_.]*_extra_state"
    ):
        fresh.load_state_dict({})
    (key,) = saved  # the generator's state, under the owning module's name
    with pytest.raises(KeyError, match="missing keys"):
        fresh.load_state_dict({key: {}})
    # The loads that raised left the state as it was, so the next draws are unchanged.
    after = make(seed=5)
    after.load_state_dict(before)
    assert torch.equal(fresh(j), after(j))
