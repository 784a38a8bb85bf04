"""Bad input, constructor validation, the state protocol and ``repr``, for every table entry."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch

from jdoptim.aggregation import (
    MGDA,
    Constant,
    DualProj,
    DualProjWeighting,
    GramianWeightedAggregator,
    Mean,
    MeanWeighting,
    MGDAWeighting,
    UPGrad,
    UPGradWeighting,
    WeightedAggregator,
)
from jdoptim.aggregation._bases import checked_finite
from tests.aggregation import _inputs
from tests.aggregation._inputs import to_torch
from tests.aggregation._table import AGGREGATORS_UNDER_TEST, Entry

ENTRIES = pytest.mark.parametrize("entry", AGGREGATORS_UNDER_TEST, ids=str)

BAD_INPUTS = [
    (torch.ones(3), ValueError, r"matrix of shape \[m, n\], got shape \(3,\)"),
    (torch.ones(2, 3, 4), ValueError, r"matrix of shape \[m, n\], got shape \(2, 3, 4\)"),
    (torch.ones(()), ValueError, r"matrix of shape \[m, n\], got shape \(\)"),
    ([[1.0, 2.0], [3.0, 4.0]], TypeError, "expected a torch.Tensor matrix, got list"),
    (np.ones((2, 3)), TypeError, "expected a torch.Tensor matrix, got ndarray"),
    (
        torch.ones(2, 3, dtype=torch.int64),
        ValueError,
        "floating-point matrix, got dtype torch.int64",
    ),
    (torch.ones(2, 3, dtype=torch.bool), ValueError, "floating-point matrix, got dtype torch.bool"),
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), ValueError, "NaN or inf"),
    (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), ValueError, "NaN or inf"),
    (torch.tensor([[1.0, -float("inf")], [0.0, 1.0]]), ValueError, "NaN or inf"),
]
BAD_IDS = ["1-D", "3-D", "0-D", "list", "numpy", "int", "bool", "nan", "inf", "-inf"]


@ENTRIES
@pytest.mark.parametrize(("matrix", "error", "match"), BAD_INPUTS, ids=BAD_IDS)
def test_bad_input_raises(entry: Entry, matrix, error, match):
    with pytest.raises(error, match=match):
        entry.make(2)(matrix)


@ENTRIES
def test_bad_gramian_raises(entry: Entry):
    aggregator = entry.make(3)
    if not isinstance(aggregator, GramianWeightedAggregator):
        pytest.skip("not Gramian-based")
    with pytest.raises(ValueError, match="square Gramian"):
        aggregator.weights_from_gramian(torch.ones(3, 2))
    with pytest.raises(ValueError, match="NaN or inf"):
        aggregator.weights_from_gramian(torch.full((3, 3), float("nan")))


@pytest.mark.parametrize("weighting", [UPGradWeighting(), DualProjWeighting(), MGDAWeighting()])
def test_weightings_validate_the_gramian(weighting):
    with pytest.raises(ValueError, match="square Gramian"):
        weighting(torch.ones(3, 2))
    with pytest.raises(ValueError, match="NaN or inf"):
        weighting(torch.tensor([[1.0, float("inf")], [float("inf"), 1.0]]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epsilon": 0.0}, "epsilon must be positive, got 0.0"),
        ({"epsilon": -1e-3}, "epsilon must be positive"),
        ({"epsilon": float("nan")}, "epsilon must be positive"),
        ({"max_iters": 0}, "max_iters must be a positive int, got 0"),
        ({"max_iters": -5}, "max_iters must be a positive int"),
        ({"max_iters": 2.5}, "max_iters must be a positive int, got 2.5"),
        ({"max_iters": True}, "max_iters must be a positive int, got True"),
        ({"max_iters": "10"}, "max_iters must be a positive int"),
    ],
)
def test_mgda_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MGDA(**kwargs)


@pytest.mark.parametrize("cls", [UPGrad, DualProj])
@pytest.mark.parametrize(
    ("pref", "error", "match"),
    [
        (torch.ones(2, 2), ValueError, r"pref_vector must be 1-D, got shape \(2, 2\)"),
        (torch.tensor([1.0, float("nan")]), ValueError, "finite floating-point"),
        (torch.tensor([1, 2]), ValueError, "finite floating-point"),
        ([0.5, 0.5], TypeError, "pref_vector must be a Tensor or None, got list"),
    ],
    ids=["2-D", "nan", "int", "list"],
)
def test_pref_vector_invalid(cls, pref, error, match):
    with pytest.raises(error, match=match):
        cls(pref)


@pytest.mark.parametrize("cls", [UPGrad, DualProj])
def test_pref_vector_wrong_length_at_call(cls):
    aggregator = cls(torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="pref_vector has 2 entries but the matrix has 3 rows"):
        aggregator(torch.eye(3))


def test_weighted_aggregator_needs_a_weighting():
    with pytest.raises(TypeError, match="expected a Weighting, got function"):
        WeightedAggregator(lambda g: g)  # type: ignore[arg-type]


# --- State protocol -----------------------------------------------------------------------------


@ENTRIES
def test_state_protocol(entry: Entry):
    aggregator = entry.make(4)
    matrix = to_torch(_inputs.conflicting(4, 5, 0))
    state = aggregator.state_dict()
    if entry.stateless:
        assert state == {}
        aggregator.load_state_dict({})
        aggregator.reset()
        with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"step\""):
            aggregator.load_state_dict({"step": 3})
        return
    # A stateful entry: a fresh instance loads the state and continues identically.
    aggregator(matrix)
    buffer = io.BytesIO()
    torch.save(aggregator.state_dict(), buffer)  # what a checkpoint does
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    expected = aggregator(matrix)
    fresh = entry.make(4)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh(matrix), expected)


@ENTRIES
def test_copy_and_pickle(entry: Entry):
    aggregator = entry.make(3)
    matrix = to_torch(_inputs.conflicting(3, 4, 1))
    for clone in (copy.deepcopy(aggregator), pickle.loads(pickle.dumps(aggregator))):
        aggregator.reset()
        clone.reset()
        assert torch.equal(clone(matrix), aggregator(matrix))
        assert repr(clone) == repr(aggregator)


@ENTRIES
def test_repr_names_the_class(entry: Entry):
    aggregator = entry.make(3)
    assert repr(aggregator).startswith(f"{type(aggregator).__name__}(")
    assert repr(aggregator).endswith(")")


def test_repr_shows_constructor_arguments():
    assert repr(UPGrad()) == "UPGrad(pref_vector=None, projector=ExactProjector())"
    assert (
        repr(DualProj(torch.tensor([0.25, 0.75])))
        == "DualProj(pref_vector=tensor([0.2500, 0.7500]), projector=ExactProjector())"
    )
    assert repr(MGDA(epsilon=0.01, max_iters=7)) == "MGDA(epsilon=0.01, max_iters=7)"
    assert repr(MGDA()) == "MGDA(epsilon=0.001, max_iters=100)"
    assert repr(Constant(torch.tensor([1.0, -2.0]))) == "Constant(weights=tensor([ 1., -2.]))"
    assert repr(Mean()) == "Mean()"
    assert repr(MeanWeighting()) == "MeanWeighting()"
    assert (
        repr(UPGradWeighting()) == "UPGradWeighting(pref_vector=None, projector=ExactProjector())"
    )


# --- Known limits (strict xfail: they turn into failures once fixed, to drop the marker) -------


@pytest.mark.parametrize(
    ("dtype", "scale"),
    [
        (torch.float64, 1e-200),  # J Jᵀ ~ 1e-400: the homogeneous aggregators scale J first
        (torch.float64, 1e-160),
        (torch.float64, 1e160),  # J Jᵀ ~ 1e320 overflows
        (torch.float64, 1e300),
        (torch.float32, 1e-24),  # the float64 Gramian of jdoptim.linalg.gramian holds it
    ],
)
def test_gramian_underflow_keeps_non_conflicting(dtype, scale):
    j = torch.tensor([[1.0, 0.0], [-2.0, 1.0]], dtype=dtype) * scale
    update = UPGrad()(j).double() / scale  # rescaled: the conflict itself would underflow too
    assert float((j.double() / scale @ update).min()) >= 0.0


_SCALE_FREE = [
    e
    for e in AGGREGATORS_UNDER_TEST
    if e.claims.homogeneous and e.claims.stateless and e.claims.deterministic
]


@pytest.mark.parametrize("scale", [2.0**-700, 2.0**-500, 2.0**500, 2.0**1000])
@pytest.mark.parametrize("entry", _SCALE_FREE, ids=str)
def test_homogeneous_at_the_ends_of_float64(entry: Entry, scale):
    """A(sJ) = s A(J) for a power of two s, however far J Jᵀ leaves float64's range."""
    j = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = entry.make(5)(j)
    actual = entry.make(5)(j * scale) / scale
    torch.testing.assert_close(actual, expected, rtol=max(entry.rtol, 1e-9), atol=0)


def test_gramian_overflow_finite_input():
    j = torch.tensor([[1.0, 0.0], [-2.0, 1.0]]) * 1e20
    assert bool(torch.isfinite(UPGrad()(j)).all())


def test_a_matrix_its_caller_checked_is_read_again_once_modified():
    """checked_finite spares one read of that very tensor, unmodified; nothing else."""
    gramian = torch.eye(3, dtype=torch.float64)
    with checked_finite(gramian):
        UPGradWeighting()(gramian)
        gramian[1, 1] = float("nan")
        with pytest.raises(ValueError, match="NaN or inf"):
            UPGradWeighting()(gramian)
        with pytest.raises(ValueError, match="NaN or inf"):
            UPGradWeighting()(torch.full((3, 3), float("inf"), dtype=torch.float64))
