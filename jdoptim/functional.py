"""The functional API: Jacobians into ``.jac`` fields, then an aggregation into ``.grad``.

These are the functions of :mod:`jdoptim.autojac` (named as in TorchJD, so code written for it
switches by changing an import), plus :func:`~jdoptim.aggregation.jac_pair_to_grad`::

    backward(losses)  # each leaf the losses reach gets a .jac of shape [m, *p.shape]
    jac_to_grad(model.parameters(), UPGrad())  # .jac -> aggregated .grad, .jac deleted
"""

from jdoptim.aggregation import jac_pair_to_grad
from jdoptim.autojac import backward, jac, jac_to_grad, mtl_backward

__all__ = ["backward", "jac", "jac_pair_to_grad", "jac_to_grad", "mtl_backward"]
