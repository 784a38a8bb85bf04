"""Engines: compute the Jacobian of a loss vector (or what an aggregator needs of it)."""

from jdoptim.engine._assembly import NonFiniteGramianError
from jdoptim.engine._graph import reachable_leaves
from jdoptim.engine._jacobian import JacobianEngine
from jdoptim.engine._layer_gramian import LayerGramianEngine
from jdoptim.engine._mixing import SampleMixingError
from jdoptim.engine._per_sample import PerSampleEngine
from jdoptim.engine._reduce import aggregate_jacobians

__all__ = [
    "JacobianEngine",
    "LayerGramianEngine",
    "NonFiniteGramianError",
    "PerSampleEngine",
    "SampleMixingError",
    "aggregate_jacobians",
    "reachable_leaves",
]
