"""Linear-algebra kernels used by the aggregators.

:func:`gramian` forms ``J Jᵀ`` in float64 without overflow or underflow, :func:`trim_gramian`
removes the directions that rounding ``J`` to its dtype creates, :func:`project_weights` projects
onto the dual cone of the rows exactly (batched, certified), :func:`project_weights_quadprog` is
its one-problem-at-a-time reference, :func:`project_simplex` projects onto the simplex.
"""

from jdoptim.linalg._active_set import project_weights
from jdoptim.linalg._dual_cone import project_weights_quadprog
from jdoptim.linalg._gramian import gramian, trim_gramian
from jdoptim.linalg._projector import DualConeProjector, ExactProjector, QuadprogProjector
from jdoptim.linalg._simplex import project_simplex

__all__ = [
    "DualConeProjector",
    "ExactProjector",
    "QuadprogProjector",
    "gramian",
    "project_simplex",
    "project_weights",
    "project_weights_quadprog",
    "trim_gramian",
]
