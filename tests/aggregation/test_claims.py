"""The claims table is complete and agrees with the code it describes."""

from __future__ import annotations

import inspect

import pytest

import jdoptim.aggregation as aggregation
from jdoptim.aggregation import Aggregator, Weighting
from jdoptim.aggregation._claims import CLAIMS, claims_of
from tests.aggregation._table import AGGREGATORS_UNDER_TEST

BASES = {"Aggregator", "Weighting", "WeightedAggregator", "GramianWeightedAggregator"}
PUBLIC_METHODS = [
    getattr(aggregation, name)
    for name in aggregation.__all__
    if name not in BASES
    and inspect.isclass(getattr(aggregation, name))
    and issubclass(getattr(aggregation, name), (Aggregator, Weighting))
    and not inspect.isabstract(getattr(aggregation, name))
]


@pytest.mark.parametrize("cls", PUBLIC_METHODS, ids=lambda c: c.__name__)
def test_every_public_method_has_claims(cls: type):
    claims = claims_of(cls)
    assert cls in (claims.aggregator, claims.weighting)


def test_unknown_class_raises():
    with pytest.raises(KeyError, match="int"):
        claims_of(int)


@pytest.mark.parametrize("claims", CLAIMS, ids=lambda c: c.name)
def test_every_method_is_tested(claims):
    """Each table entry has at least one configuration in the property battery."""
    assert any(entry.claims.name == claims.name for entry in AGGREGATORS_UNDER_TEST)


@pytest.mark.parametrize("claims", CLAIMS, ids=lambda c: c.name)
def test_hyperparameters_match_the_signature(claims):
    """Names and defaults listed for the docs are those of the constructor, in order."""
    cls = claims.aggregator or claims.weighting
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert [h.name for h in claims.hyperparameters] == [p.name for p in parameters]
    for documented, parameter in zip(claims.hyperparameters, parameters, strict=True):
        if parameter.default is inspect.Parameter.empty:
            assert documented.default == "(required)", parameter.name
        elif callable(parameter.default):
            assert documented.default == "identity", parameter.name
        else:
            assert documented.default == repr(parameter.default), parameter.name


@pytest.mark.parametrize("claims", CLAIMS, ids=lambda c: c.name)
def test_consistent_flags(claims):
    """Linear implies homogeneous; non-Gramian methods are the ones that are not ``Jᵀw(G)``."""
    if claims.linear:
        assert claims.homogeneous
    aggregator = claims.aggregator
    if aggregator is not None:
        gramian_based = issubclass(aggregator, aggregation.GramianWeightedAggregator)
        assert claims.gramian_only == gramian_based
    if claims.paper is not None:
        assert claims.paper.url.startswith("https://")
        assert 1950 < claims.paper.year < 2100 and claims.paper.authors
