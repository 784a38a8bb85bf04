"""Linear-algebra kernels used by the aggregators."""

from jdoptim.linalg._active_set import project_weights
from jdoptim.linalg._dual_cone import project_weights_quadprog
from jdoptim.linalg._gramian import gramian
from jdoptim.linalg._simplex import project_simplex

__all__ = ["gramian", "project_simplex", "project_weights", "project_weights_quadprog"]
